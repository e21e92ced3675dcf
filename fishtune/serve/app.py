"""The web chat: a Flask app (page + JSON API) over any :mod:`fishtune.serve.backends` back end.

:func:`create_app` puts the parts together: the limits
(:class:`~fishtune.serve.state.ServerConfig`), the session table
(:mod:`fishtune.serve.sessions`, bounded and expiring, a lock per session),
generation behind its gate (:mod:`fishtune.serve.streaming`), the endpoints
(:mod:`fishtune.serve.routes`) and the JSON error handlers
(:mod:`fishtune.serve.errors`: every error is ``{"error": "..."}`` with a
4xx/5xx status, never a stack trace).
"""
from __future__ import annotations

import functools
import time
from typing import Callable

from flask import Flask, Response

from fishtune.infer.chat import ChatSession
from fishtune.infer.generation import SamplingConfig
from fishtune.serve.backends import Backend
from fishtune.serve.errors import register_error_handlers
from fishtune.serve.routes import api, page
from fishtune.serve.sessions import SessionStore
from fishtune.serve.state import EXTENSION, ServerConfig, ServerState
from fishtune.serve.streaming import Generation

# Defence in depth: the page only runs its own script; model output is text anyway.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def security_headers(resp: Response) -> Response:
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    if resp.mimetype == "text/html":
        resp.headers["Content-Security-Policy"] = PAGE_CSP
        resp.headers["X-Frame-Options"] = "DENY"
    return resp


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
) -> Flask:
    """The Flask app for ``backend`` (sampling defaults and limits as given)."""
    config = ServerConfig(sampling or SamplingConfig(), max_message_chars, max_body_bytes, max_tokens_limit,
                          max_turns, queue_timeout_s)
    new_chat = functools.partial(ChatSession, backend.template, backend.system_prompt, tokenizer=backend.tokenizer,
                                 max_context_tokens=backend.context_tokens, max_turns=max_turns)
    sessions = SessionStore(new_chat, max_sessions=max_sessions, ttl_s=session_ttl_s, clock=clock)

    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.ensure_ascii = False
    app.extensions[EXTENSION] = ServerState(config, backend, sessions, Generation(backend, queue_timeout_s))
    app.register_blueprint(page)
    app.register_blueprint(api)
    register_error_handlers(app)
    app.after_request(security_headers)
    return app


__all__ = ["create_app", "security_headers"]
