"""The web chat: a Flask app (page + JSON API) over any :mod:`fishtune.serve.backends` back end.

Endpoints (all errors are JSON ``{"error": "..."}`` with a 4xx/5xx status,
never a stack trace):

* ``GET /``: the chat page (``fishtune/static``: no external assets).
* ``POST /api/chat`` ``{"message": "...", "session_id"?, "stream"?, sampling?}``
  -> ``{"response": "...", "session_id": "..."}`` (the seed's API), or with
  ``"stream": true`` Server-Sent Events: ``data: {"delta": "..."}`` ...
  ``data: {"done": true, "finish_reason": ..., "session_id": ...}``.
* ``POST /api/clear`` -> ``{"status": "success"}``: clears the caller's history only.
* ``GET /api/history``: the caller's history (cookie ``fishtune_session`` or ``?session_id=``).
* ``GET /api/health``: back end, model, adapter, template, sessions.
* ``POST /v1/chat/completions``, ``GET /v1/models``: OpenAI-compatible, stateless.

Several users: each session has its own history (:mod:`fishtune.serve.sessions`,
bounded and expiring) and its own lock; generation itself is serialized by
one gate (an MLX / llama.cpp model is not thread-safe), so waitress threads
queue for it. A client that disconnects while streaming cancels its generation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from fishtune.serve.backends import Backend, BackendError
from fishtune.infer.chat import ChatSession
from fishtune.errors import UserError
from fishtune.infer.generation import SamplingConfig
from fishtune.serve.sessions import SessionEntry, SessionStore, check_session_id, new_session_id

logger = logging.getLogger(__name__)

COOKIE = "fishtune_session"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class ServerConfig:
    sampling: SamplingConfig
    max_message_chars: int = 2000
    max_body_bytes: int = 64 * 1024
    max_tokens_limit: int = 4096
    max_turns: int = 20
    queue_timeout_s: float = 300.0


class GenerationGate:
    """One generation at a time (when the back end needs it); waiters time out with 503."""

    def __init__(self, serialize: bool, timeout_s: float):
        self._lock = threading.Lock() if serialize else None
        self.timeout_s = timeout_s
        self.waiting = 0
        self._count_lock = threading.Lock()

    def acquire(self) -> None:
        if self._lock is None:
            return
        with self._count_lock:
            self.waiting += 1
        try:
            ok = self._lock.acquire(timeout=self.timeout_s)
        finally:
            with self._count_lock:
                self.waiting -= 1
        if not ok:
            raise ApiError(503, f"server busy: no generation slot within {self.timeout_s:g} s; try again later")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "GenerationGate":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def busy(self) -> bool:
        return self._lock is not None and self._lock.locked()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Stream:
    """A WSGI body iterable whose ``close`` always runs the cleanup (even if never iterated).

    Why not a bare generator: closing a generator that never started skips
    its ``finally``, which would leak the generation lock.
    """

    def __init__(self, gen: Iterator[str], cleanup: Callable[[], None]):
        self._gen = gen
        self._cleanup: Callable[[], None] | None = cleanup

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._gen).encode("utf-8")

    def close(self) -> None:
        try:
            self._gen.close()
        finally:
            cleanup, self._cleanup = self._cleanup, None
            if cleanup is not None:
                cleanup()


def create_app(
    backend: Backend,
    *,
    sampling: SamplingConfig | None = None,
    max_message_chars: int = 2000,
    max_body_bytes: int = 64 * 1024,
    max_tokens_limit: int = 4096,
    max_sessions: int = 1000,
    session_ttl_s: float = 3600.0,
    max_turns: int = 20,
    queue_timeout_s: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
):
    """The Flask app for ``backend`` (sampling defaults and limits as given)."""
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    if max_message_chars < 1:
        raise UserError(f"max_message_chars={max_message_chars} must be at least 1")
    cfg = ServerConfig(sampling or SamplingConfig(), max_message_chars, max_body_bytes, max_tokens_limit,
                       max_turns, queue_timeout_s)
    if cfg.sampling.max_tokens > max_tokens_limit:
        raise UserError(f"--max-tokens {cfg.sampling.max_tokens} is over the server limit of {max_tokens_limit}")

    def new_chat() -> ChatSession:
        return ChatSession(backend.template, backend.system_prompt, tokenizer=backend.tokenizer,
                           max_context_tokens=backend.context_tokens, max_turns=max_turns)

    store = SessionStore(new_chat, max_sessions=max_sessions, ttl_s=session_ttl_s, clock=clock)
    gate = GenerationGate(backend.serialize, queue_timeout_s)

    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.ensure_ascii = False
    app.extensions["fishtune"] = {"backend": backend, "sessions": store, "gate": gate, "config": cfg}

    # ---- request helpers ---------------------------------------------------------
    def json_body(required: bool = True) -> dict[str, Any]:
        data = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH -> 413
        if not data.strip():
            if required:
                raise ApiError(400, 'request body is empty; send JSON like {"message": "你好"}')
            return {}
        if request.mimetype != "application/json":
            got = request.content_type or "none"
            raise ApiError(415, f"Content-Type must be application/json (got {got}); "
                                'e.g. curl -H "Content-Type: application/json"')
        try:
            body = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "request body is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        except RecursionError:  # e.g. [[[[...]]]] 30000 deep: still under the size limit
            raise ApiError(400, "request body is JSON nested too deeply; send a flat object like {\"message\": \"你好\"}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def caller_session_id(body: dict[str, Any]) -> tuple[str | None, bool]:
        """(session id, came from the body). Body first, then the cookie (ignored when malformed)."""
        if body.get("session_id") is not None:
            return check_session_id(body["session_id"]), True
        arg = request.args.get("session_id")
        if arg is not None:
            return check_session_id(arg), True
        cookie = request.cookies.get(COOKIE)
        if cookie:
            try:
                return check_session_id(cookie), False
            except UserError:
                return None, False
        return None, False

    def get_message(body: dict[str, Any]) -> str:
        if "message" not in body:
            raise ApiError(400, 'field "message" is missing; send {"message": "your question"}')
        msg = body["message"]
        if not isinstance(msg, str):
            raise ApiError(400, f'field "message" must be a string, got {type(msg).__name__}')
        msg = msg.strip()
        if not msg:
            raise ApiError(400, 'field "message" is empty; type a question')
        if len(msg) > cfg.max_message_chars:
            raise ApiError(400, f'field "message" is {len(msg)} characters, over the limit of '
                                f"{cfg.max_message_chars}; send a shorter question")
        return msg

    def get_stream_flag(body: dict[str, Any]) -> bool:
        s = body.get("stream", False)
        if not isinstance(s, bool):
            raise ApiError(400, f'field "stream" must be true or false, got {s!r}')
        return s

    def get_sampling(body: dict[str, Any], openai: bool = False) -> SamplingConfig:
        over = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
        if openai and body.get("max_completion_tokens") is not None:
            over["max_tokens"] = body["max_completion_tokens"]
        if openai and body.get("frequency_penalty") is not None and "repetition_penalty" not in over:
            pass  # OpenAI's penalties have no exact equivalent; accepted and ignored
        s = dataclasses.replace(cfg.sampling, **over) if over else cfg.sampling  # validates -> UserError
        if s.max_tokens > cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens={s.max_tokens} is over this server's limit of {cfg.max_tokens_limit}")
        return s

    def set_cookie(resp, sid: str) -> None:
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Lax", path="/")

    # ---- streaming ---------------------------------------------------------------
    def open_stream(messages, sampling, held: list[Callable[[], None]]):
        """Start generation under the gate and fetch the first chunk (errors become JSON, not a broken stream)."""
        gate.acquire()
        held.append(gate.release)
        cancel = threading.Event()
        it = backend.stream_chat(messages, sampling, cancel)
        held.insert(0, getattr(it, "close", lambda: None))
        held.insert(0, cancel.set)
        try:
            first = next(it)
        except StopIteration:
            first = None
        return it, first, cancel

    def run_cleanup(held: list[Callable[[], None]]) -> None:
        for fn in held:
            try:
                fn()
            except Exception:  # cleanup must release every lock whatever happens
                logger.exception("cleanup after a stream failed")
        held.clear()

    def chunks(it, first, cancel, disconnected) -> Iterator[Any]:
        """The chunks of a stream, stopping when the client is gone (``disconnected()``: waitress's check)."""
        chunk = first
        while chunk is not None:
            yield chunk
            if chunk.finish_reason is not None:
                return
            if disconnected is not None and disconnected():
                logger.info("client disconnected; stopping generation")
                cancel.set()
            chunk = next(it, None)

    # ---- pages -------------------------------------------------------------------
    @app.get("/")
    def index():
        resp = app.send_static_file("index.html")
        resp.headers["Cache-Control"] = "no-cache"
        cookie = request.cookies.get(COOKIE)
        try:
            check_session_id(cookie)
        except UserError:
            set_cookie(resp, new_session_id())
        return resp

    @app.get("/favicon.ico")
    def favicon():
        return app.send_static_file("favicon.svg")

    @app.get("/api/health")
    def health():
        problem = backend.check()
        out = {"status": "ok" if problem is None else "degraded", **backend.info(),
               "busy": gate.busy, "waiting": gate.waiting, **store.stats()}
        if problem is not None:
            out["detail"] = problem
        return jsonify(out)

    @app.get("/api/history")
    def history():
        sid, _ = caller_session_id({})
        entry = store.get(sid)
        msgs = [m for m in entry.chat.messages if m["role"] != "system"] if entry else []
        return jsonify({"session_id": sid, "messages": msgs})

    @app.post("/api/clear")
    def clear():
        body = json_body(required=False)
        sid, _ = caller_session_id(body)
        store.clear(sid)
        return jsonify({"status": "success"})

    @app.post("/api/chat")
    def chat():
        body = json_body()
        message = get_message(body)
        stream = get_stream_flag(body)
        sampling = get_sampling(body)
        sid, from_body = caller_session_id(body)
        entry = store.get_or_create(sid)
        if not entry.lock.acquire(timeout=cfg.queue_timeout_s):
            raise ApiError(503, "this session is busy with another answer; try again later")
        held: list[Callable[[], None]] = [entry.lock.release]
        try:
            entry.chat.prompt_for(message)  # drops the turns that no longer fit the budget
            messages = entry.chat.messages + [{"role": "user", "content": message}]
            if not stream:
                with gate:
                    result = backend.chat(messages, sampling)
                entry.chat.add_turn(message, result.text)
                resp = jsonify({"response": result.text, "session_id": entry.session_id})
            else:
                it, first, cancel = open_stream(messages, sampling, held)
                gone = request.environ.get("waitress.client_disconnected")
                resp = Response(_Stream(chat_events(entry, message, it, first, cancel, gone),
                                        functools.partial(run_cleanup, held)),
                                mimetype="text/event-stream")
                resp.headers["Cache-Control"] = "no-cache"
                resp.headers["X-Accel-Buffering"] = "no"
                held = []  # the stream owns the cleanup now
        finally:
            run_cleanup(held)
        if not from_body:
            set_cookie(resp, entry.session_id)
        return resp

    def chat_events(entry: SessionEntry, message: str, it, first, cancel, gone) -> Iterator[str]:
        parts: list[str] = []
        try:
            for chunk in chunks(it, first, cancel, gone):
                if chunk.text:
                    parts.append(chunk.text)
                    yield sse({"delta": chunk.text})
                if chunk.finish_reason is not None:
                    if chunk.finish_reason != "cancelled":
                        entry.chat.add_turn(message, "".join(parts))
                    yield sse({"done": True, "finish_reason": chunk.finish_reason, "session_id": entry.session_id})
                    return
        except GeneratorExit:
            # waitress closes the body when the client went away: the cleanup cancels generation
            logger.info("client disconnected; stopping generation (session %s)", entry.session_id[:6])
            raise
        except (BackendError, UserError) as exc:
            logger.warning("stream failed: %s", exc)
            yield sse({"error": str(exc)})
        except Exception:
            logger.exception("stream failed")
            yield sse({"error": "internal error"})

    # ---- OpenAI-compatible -------------------------------------------------------
    def openai_messages(body: dict[str, Any]) -> list[dict[str, str]]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, 'field "messages" must be a non-empty list of {"role", "content"} objects')
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object with role and content")
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported")
                content = "".join(texts)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string, got {type(content).__name__}")
            if m.get("role") not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role {m.get('role')!r} is not one of system, user, assistant")
            if len(content) > cfg.max_message_chars * 4:
                raise ApiError(400, f"messages[{i}].content is {len(content)} characters, over the limit of "
                                    f"{cfg.max_message_chars * 4}")
            out.append({"role": m["role"], "content": content})
        backend.template.render_prompt(out, None)  # alternation and last-is-user -> UserError (400)
        return out

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [
            {"id": backend.model_name, "object": "model", "created": 0, "owned_by": "fishtune"}]})

    @app.post("/v1/chat/completions")
    def completions():
        body = json_body()
        messages = openai_messages(body)
        stream = get_stream_flag(body)
        sampling = get_sampling(body, openai=True)
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, f"n={n!r} is not supported; this server returns one choice (n=1)")
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = backend.model_name
        if not stream:
            with gate:
                result = backend.chat(messages, sampling)
            finish = "length" if result.finish_reason == "length" else "stop"
            return jsonify({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generation_tokens,
                          "total_tokens": result.prompt_tokens + result.generation_tokens},
            })
        held: list[Callable[[], None]] = []
        try:
            it, first, cancel = open_stream(messages, sampling, held)
        except BaseException:
            run_cleanup(held)
            raise
        gone = request.environ.get("waitress.client_disconnected")

        def events() -> Iterator[str]:
            def chunk_obj(delta: dict, finish: str | None) -> dict:
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            yield sse(chunk_obj({"role": "assistant", "content": ""}, None))
            try:
                for chunk in chunks(it, first, cancel, gone):
                    if chunk.text:
                        yield sse(chunk_obj({"content": chunk.text}, None))
                    if chunk.finish_reason is not None:
                        yield sse(chunk_obj({}, "length" if chunk.finish_reason == "length" else "stop"))
                        break
            except (BackendError, UserError) as exc:
                yield sse({"error": str(exc)})
            except Exception:
                logger.exception("stream failed")
                yield sse({"error": "internal error"})
            yield "data: [DONE]\n\n"

        resp = Response(_Stream(events(), lambda: run_cleanup(held)), mimetype="text/event-stream")
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    # ---- errors: always JSON, never a traceback ----------------------------------
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return jsonify({"error": exc.message}), exc.status

    @app.errorhandler(UserError)
    def user_error(exc: UserError):
        return jsonify({"error": str(exc)}), 400

    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError):
        logger.warning("back end: %s", exc)
        return jsonify({"error": str(exc)}), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = exc.code or 500
        if code == 404:
            msg = f"no such endpoint: {request.method} {request.path}; the API is /api/chat, /api/clear, " \
                  "/api/history, /api/health, /v1/chat/completions, /v1/models"
        elif code == 405:
            allowed = ", ".join(sorted(m for m in (exc.valid_methods or []) if m not in ("HEAD", "OPTIONS")))
            msg = f"method {request.method} is not allowed on {request.path}; use {allowed}"
        elif code == 413:
            msg = f"request body is over the limit of {cfg.max_body_bytes} bytes; send a shorter message"
        else:
            msg = f"{exc.name}: {exc.description}"
        resp = jsonify({"error": msg})
        resp.status_code = code
        if code == 405 and exc.valid_methods:
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.path)
        return jsonify({"error": "internal error"}), 500

    @app.after_request
    def security_headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        if resp.mimetype == "text/html":
            # Defence in depth: the page only runs its own script; model output is text anyway.
            resp.headers["Content-Security-Policy"] = (
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
            resp.headers["X-Frame-Options"] = "DENY"
        return resp

    return app


__all__ = ["create_app", "ApiError", "GenerationGate", "COOKIE", "SAMPLING_KEYS", "sse"]
