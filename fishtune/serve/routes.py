"""The endpoints, one function each: the page (``page``) and the API (``api``).

* ``GET /``, ``GET /favicon.ico``: the chat page (``fishtune/serve/static``: no external assets).
* ``POST /api/chat`` ``{"message": "...", "session_id"?, "stream"?, sampling?}``
  -> ``{"response": "...", "session_id": "..."}`` (the seed's API), or with
  ``"stream": true`` Server-Sent Events (:class:`fishtune.serve.events.SeedEvents`).
* ``POST /api/clear`` -> ``{"status": "success"}``: clears the caller's history only.
* ``GET /api/history``: the caller's history (cookie ``fishtune_session`` or ``?session_id=``).
* ``GET /api/health``: back end, model, adapter, template, generation queue, sessions.
* ``POST /v1/chat/completions``, ``GET /v1/models``: OpenAI-compatible, stateless.

Parsing is :mod:`fishtune.serve.parsing`, generation :mod:`fishtune.serve.streaming`.
What a request holds (the session's lock, the generation gate, the running
generation) sits in one :class:`contextlib.ExitStack`: released when the
endpoint returns, or handed to the streamed body, which releases it when the
server closes it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from flask import Blueprint, Response, current_app, jsonify

from fishtune.serve.errors import API_BLUEPRINT, ApiError
from fishtune.serve.events import OpenAIEvents, SeedEvents
from fishtune.serve.parsing import (
    COOKIE,
    caller_session_id,
    cookie_session_id,
    json_body,
    parse_chat,
    parse_completion,
)
from fishtune.serve.sessions import SessionEntry, SessionStorage, new_session_id
from fishtune.serve.state import current
from fishtune.serve.streaming import sse_response

page = Blueprint("page", __name__)
api = Blueprint(API_BLUEPRINT, __name__)


def set_cookie(resp: Response, session_id: str) -> None:
    resp.set_cookie(COOKIE, session_id, httponly=True, samesite="Lax", path="/")


@contextlib.contextmanager
def session_turn(entry: SessionEntry, timeout_s: float) -> Iterator[None]:
    """The session's lock for one answer: a user's turns are answered in order."""
    if not entry.lock.acquire(timeout=timeout_s):
        raise ApiError(503, "this session is busy with another answer; try again later")
    try:
        yield
    finally:
        entry.lock.release()


def store_answer(sessions: SessionStorage, entry: SessionEntry, question: str, finish_reason: str,
                 answer: str) -> None:
    """Keep the turn in the history, unless generation was cancelled."""
    if finish_reason != "cancelled":
        sessions.add_turn(entry, question, answer)


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
    return jsonify({"session_id": sid, "messages": current().sessions.history(sid)})


@api.post("/api/clear")
def clear() -> Response:
    sid, _ = caller_session_id(json_body(required=False))
    current().sessions.clear(sid)
    return jsonify({"status": "success"})


@api.post("/api/chat")
def chat() -> Response:
    st = current()
    req = parse_chat(st.config)
    entry = st.sessions.get_or_create(req.session_id)
    events = SeedEvents(entry.session_id)
    with contextlib.ExitStack() as held:
        held.enter_context(session_turn(entry, st.config.queue_timeout_s))
        entry.chat.prompt_for(req.message)  # drops the turns that no longer fit the budget
        messages = entry.chat.messages + [{"role": "user", "content": req.message}]
        remember = functools.partial(store_answer, st.sessions, entry, req.message)
        if req.stream:
            live = held.enter_context(st.generation.stream(messages, req.sampling))
            resp = sse_response(live, events, held, on_finish=remember)
        else:
            result = st.generation.answer(messages, req.sampling)
            remember(result.finish_reason, result.text)
            resp = jsonify(events.response(result))
    if not req.session_from_body:
        set_cookie(resp, entry.session_id)
    return resp


# ---- OpenAI-compatible ---------------------------------------------------------------


@api.get("/v1/models")
def models() -> Response:
    return jsonify({"object": "list", "data": [
        {"id": current().backend.model_name, "object": "model", "created": 0, "owned_by": "fishtune"}]})


@api.post("/v1/chat/completions")
def completions() -> Response:
    st = current()
    req = parse_completion(st.config)
    events = OpenAIEvents(st.backend.model_name)
    if not req.stream:
        return jsonify(events.response(st.generation.answer(req.messages, req.sampling)))
    with contextlib.ExitStack() as held:
        live = held.enter_context(st.generation.stream(req.messages, req.sampling))
        return sse_response(live, events, held)


__all__ = ["api", "page"]
