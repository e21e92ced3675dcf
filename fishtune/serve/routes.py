"""The endpoints, one function each: the page (``page``) and the API (``api``).

* ``GET /``, ``GET /favicon.ico``: the chat page (``fishtune/serve/static``: no external assets).
* ``POST /api/chat`` ``{"message": "...", "session_id"?, "stream"?, sampling?}``
  -> ``{"response": "...", "session_id": "..."}`` (the seed's API), or with
  ``"stream": true`` Server-Sent Events (:class:`fishtune.serve.events.SeedEvents`).
* ``POST /api/clear`` -> ``{"status": "success"}``: clears the caller's history only.
* ``GET /api/history``: the caller's history (cookie ``fishtune_session`` or ``?session_id=``).
* ``GET /api/health``: back end, model and adapter (names, not paths), generation, sessions.
* ``POST /v1/chat/completions``, ``GET /v1/models``: OpenAI-compatible, stateless.

Parsing is :mod:`fishtune.serve.parsing`, generation :mod:`fishtune.serve.streaming`,
the conversations :mod:`fishtune.serve.store`. What a request holds (the
session's lock, its generation slot, the running generation) sits in one
:class:`contextlib.ExitStack`: released when the endpoint returns, or handed
to the streamed body, which releases it when the server closes it. A turn is
saved (:meth:`~fishtune.serve.sessions.SessionStorage.add_turn`) before the
response completes, and only when it finished (not cancelled).
"""
from __future__ import annotations

import contextlib
import functools

from flask import Blueprint, Response, current_app, jsonify

from fishtune.serve.errors import API_BLUEPRINT
from fishtune.serve.events import OpenAIEvents, SeedEvents
from fishtune.serve.parsing import (
    COOKIE,
    caller_session_id,
    cookie_session_id,
    json_body,
    parse_chat,
    parse_completion,
)
from fishtune.serve.sessions import Conversation, SessionStorage, new_session_id
from fishtune.serve.state import ServerState, current
from fishtune.serve.streaming import client_disconnected, sse_response

page = Blueprint("page", __name__)
api = Blueprint(API_BLUEPRINT, __name__)


def set_cookie(resp: Response, session_id: str) -> None:
    resp.set_cookie(COOKIE, session_id, httponly=True, samesite="Lax", path="/")


def store_answer(sessions: SessionStorage, conversation: Conversation, question: str, finish_reason: str,
                 answer: str) -> None:
    """Keep the finished turn, unless generation was cancelled (the client went away)."""
    if finish_reason != "cancelled":
        sessions.add_turn(conversation, question, answer)


def prompt_messages(st: ServerState, conversation: Conversation, question: str) -> list[dict[str, str]]:
    """The chat messages for ``question``: the system prompt and the saved turns that fit the prompt budget."""
    chat = st.new_chat()
    chat.turns = list(conversation.turns)
    chat.prompt_for(question)  # drops the oldest turns that don't fit
    return chat.messages + [{"role": "user", "content": question}]


# ---- the page ------------------------------------------------------------------------


@page.get("/")
def index() -> Response:
    resp = current_app.send_static_file("index.html")
    resp.headers["Cache-Control"] = "no-cache"
    if cookie_session_id() is None:
        set_cookie(resp, new_session_id())
    return resp


@page.get("/favicon.ico")
def favicon() -> Response:
    return current_app.send_static_file("favicon.svg")


# ---- the seed's API ------------------------------------------------------------------


@api.get("/api/health")
def health() -> Response:
    st = current()
    problem = st.backend.check()
    out = {"status": "ok" if problem is None else "degraded", **st.backend.info(), **st.generation.stats(),
           **st.sessions.stats()}
    if problem is not None:
        out["detail"] = problem
    return jsonify(out)


@api.get("/api/history")
def history() -> Response:
    sid, _ = caller_session_id({})
    return jsonify({"session_id": sid, "messages": current().sessions.load(sid).messages()})


@api.post("/api/clear")
def clear() -> Response:
    sid, _ = caller_session_id(json_body(required=False))  # an empty body (the seed's curl): the cookie's session
    current().sessions.clear(sid)
    return jsonify({"status": "success"})


@api.post("/api/chat")
def chat() -> Response:
    st = current()
    req = parse_chat(st.config)
    sid = req.session_id or new_session_id()
    events = SeedEvents(sid)
    with contextlib.ExitStack() as held:
        held.enter_context(st.locks.hold(sid, st.config.queue_timeout_s))
        conversation = st.sessions.load(sid)
        messages = prompt_messages(st, conversation, req.message)
        remember = functools.partial(store_answer, st.sessions, conversation, req.message)
        if req.stream:
            live = held.enter_context(st.generation.stream(messages, req.sampling, disconnected=client_disconnected()))
            resp = sse_response(live, events, held, on_finish=remember)
        else:
            result = st.generation.answer(messages, req.sampling, disconnected=client_disconnected())
            remember(result.finish_reason, result.text)
            resp = jsonify(events.response(result))
    if not req.session_from_body:
        set_cookie(resp, sid)
    return resp


# ---- OpenAI-compatible ---------------------------------------------------------------


@api.get("/v1/models")
def models() -> Response:
    return jsonify({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "fishtune"} for name in current().config.model_names]})


@api.post("/v1/chat/completions")
def completions() -> Response:
    st = current()
    req = parse_completion(st.config)
    events = OpenAIEvents(req.model, include_usage=req.include_usage)
    if not req.stream:
        result = st.generation.answer(req.messages, req.sampling, req.stop, disconnected=client_disconnected())
        return jsonify(events.response(result))
    with contextlib.ExitStack() as held:
        live = held.enter_context(st.generation.stream(req.messages, req.sampling, req.stop,
                                                       disconnected=client_disconnected()))
        return sse_response(live, events, held)


__all__ = ["api", "page"]
