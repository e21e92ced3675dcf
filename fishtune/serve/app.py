"""The web chat: a Flask app (page + JSON API) over any :mod:`fishtune.serve.backends` back end.

:func:`create_app` puts the parts together: the limits
(:class:`~fishtune.serve.state.ServerConfig`), the conversation store
(:mod:`fishtune.serve.store`: SQLite, a file or memory; bounded and
expiring) with a lock per session in flight, generation behind admission and
its gate (:mod:`fishtune.serve.streaming`), the Host and Origin checks
(:mod:`fishtune.serve.security`), the endpoints (:mod:`fishtune.serve.routes`)
and the JSON error handlers (:mod:`fishtune.serve.handlers`: every error is
JSON with a 4xx/5xx status, never a stack trace).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Iterable

from flask import Flask, Response

from fishtune.infer.chat import ChatSession
from fishtune.infer.generation import SamplingConfig
from fishtune.serve.backends import Backend
from fishtune.serve.handlers import register_error_handlers
from fishtune.serve.routes import api, page
from fishtune.serve.security import HostPolicy, check_same_origin
from fishtune.serve.sessions import SessionLocks
from fishtune.serve.state import EXTENSION, ServerConfig, ServerState, current
from fishtune.serve.store import SqliteSessionStore
from fishtune.serve.streaming import Generation

# Defence in depth: the page only runs its own script; model output is text anyway.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
MODEL_ALIAS = "fish-care"  # what /v1 clients may call the model besides its own name (the README's examples)


def security_headers(resp: Response) -> Response:
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    if resp.mimetype == "text/html":
        resp.headers["Content-Security-Policy"] = PAGE_CSP
        resp.headers["X-Frame-Options"] = "DENY"
    return resp


def guard_request() -> None:
    """Before routing: only allowed Host names, and no state change from another origin's page."""
    current().hosts.check_host()
    check_same_origin()


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
    max_active: int = 30,
    store_path: str | Path | None = None,
    allow_hosts: Iterable[str] = (),
    bind_host: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """The Flask app for ``backend`` (sampling defaults and limits as given).

    ``store_path``: the SQLite file of the conversations (None: in memory);
    ``max_active``: requests in generation at once (keep it below the
    server's thread count); ``allow_hosts``/``bind_host``: Host names
    answered besides the loopback ones.
    """
    names = tuple(dict.fromkeys([backend.model_name, MODEL_ALIAS]))
    config = ServerConfig(sampling or SamplingConfig(), max_message_chars, max_body_bytes, max_tokens_limit,
                          max_turns, queue_timeout_s, backend.vocab_size, names)
    new_chat = functools.partial(ChatSession, backend.template, backend.system_prompt, tokenizer=backend.tokenizer,
                                 max_context_tokens=backend.context_tokens, max_turns=max_turns)
    store = SqliteSessionStore(store_path, max_sessions=max_sessions, ttl_s=session_ttl_s, max_turns=max_turns,
                               clock=clock)

    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.ensure_ascii = False
    app.extensions[EXTENSION] = ServerState(config, backend, store, SessionLocks(),
                                            Generation(backend, queue_timeout_s, max_active),
                                            HostPolicy(allow_hosts, bind_host), new_chat)
    app.before_request(guard_request)
    app.register_blueprint(page)
    app.register_blueprint(api)
    register_error_handlers(app)
    app.after_request(security_headers)
    return app


def close_app(app: Flask) -> None:
    """Close what the app opened (the conversation store)."""
    app.extensions[EXTENSION].sessions.close()


__all__ = ["create_app", "close_app", "security_headers", "MODEL_ALIAS"]
