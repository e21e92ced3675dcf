"""Request parsing and validation: everything HTTP- or OpenAI-specific about a request.

The JSON body (size, Content-Type, encoding, shape), the ``message`` field,
the ``stream`` flag, per-request sampling, OpenAI ``messages`` (content parts,
size, the roles we support) and the caller's session id (body, query string,
cookie). The conversation rules themselves (roles alternate, the last turn is
the user's) are :func:`fishtune.template.check_messages`. Every problem is an
:class:`~fishtune.serve.errors.ApiError` (or a UserError, also a 400) that
names the field.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from flask import request

from fishtune.errors import UserError
from fishtune.infer.generation import SamplingConfig
from fishtune.serve.errors import ApiError
from fishtune.serve.sessions import check_session_id
from fishtune.serve.state import ServerConfig
from fishtune.template import check_messages

COOKIE = "fishtune_session"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")
OPENAI_ROLES = ("system", "user", "assistant")


@dataclass
class ChatRequest:
    """``POST /api/chat``."""

    message: str
    stream: bool
    sampling: SamplingConfig
    session_id: str | None  # None: a new session
    session_from_body: bool  # False: from the cookie (or new), so the answer sets the cookie


@dataclass
class CompletionRequest:
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, str]]
    stream: bool
    sampling: SamplingConfig


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


def cookie_session_id() -> str | None:
    """The session id in the cookie; None when there is none or it is malformed."""
    cookie = request.cookies.get(COOKIE)
    try:
        return check_session_id(cookie) if cookie else None
    except UserError:
        return None


def caller_session_id(body: dict[str, Any]) -> tuple[str | None, bool]:
    """(session id, came from the request itself). The body first, then ``?session_id=``, then the cookie."""
    if body.get("session_id") is not None:
        return check_session_id(body["session_id"]), True
    arg = request.args.get("session_id")
    if arg is not None:
        return check_session_id(arg), True
    return cookie_session_id(), False


def message_field(body: dict[str, Any], max_chars: int) -> str:
    if "message" not in body:
        raise ApiError(400, 'field "message" is missing; send {"message": "your question"}')
    msg = body["message"]
    if not isinstance(msg, str):
        raise ApiError(400, f'field "message" must be a string, got {type(msg).__name__}')
    msg = msg.strip()
    if not msg:
        raise ApiError(400, 'field "message" is empty; type a question')
    if len(msg) > max_chars:
        raise ApiError(400, f'field "message" is {len(msg)} characters, over the limit of '
                            f"{max_chars}; send a shorter question")
    return msg


def stream_flag(body: dict[str, Any]) -> bool:
    s = body.get("stream", False)
    if not isinstance(s, bool):
        raise ApiError(400, f'field "stream" must be true or false, got {s!r}')
    return s


def sampling_fields(body: dict[str, Any], cfg: ServerConfig, openai: bool = False) -> SamplingConfig:
    """The server's sampling defaults with the request's fields over them (OpenAI's penalties are ignored)."""
    over = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
    if openai and body.get("max_completion_tokens") is not None:
        over["max_tokens"] = body["max_completion_tokens"]
    s = dataclasses.replace(cfg.sampling, **over) if over else cfg.sampling  # validates -> UserError
    if s.max_tokens > cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens={s.max_tokens} is over this server's limit of {cfg.max_tokens_limit}")
    return s


def openai_message(i: int, m: Any, max_chars: int) -> dict[str, str]:
    """OpenAI message ``i`` as ``{"role", "content"}`` (content: a string, or its text parts joined)."""
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
    if m.get("role") not in OPENAI_ROLES:
        raise ApiError(400, f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(OPENAI_ROLES)}")
    if len(content) > max_chars:
        raise ApiError(400, f"messages[{i}].content is {len(content)} characters, over the limit of {max_chars}")
    return {"role": m["role"], "content": content}


def openai_messages(body: dict[str, Any], cfg: ServerConfig) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, 'field "messages" must be a non-empty list of {"role", "content"} objects')
    out = [openai_message(i, m, cfg.max_openai_content_chars) for i, m in enumerate(msgs)]
    check_messages(out, end="user", label="messages")  # alternation, last is the user's -> UserError (400)
    return out


def parse_chat(cfg: ServerConfig) -> ChatRequest:
    body = json_body()
    message = message_field(body, cfg.max_message_chars)
    stream = stream_flag(body)
    sampling = sampling_fields(body, cfg)
    session_id, from_body = caller_session_id(body)
    return ChatRequest(message, stream, sampling, session_id, from_body)


def parse_completion(cfg: ServerConfig) -> CompletionRequest:
    body = json_body()
    messages = openai_messages(body, cfg)
    stream = stream_flag(body)
    sampling = sampling_fields(body, cfg, openai=True)
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n={n!r} is not supported; this server returns one choice (n=1)")
    return CompletionRequest(messages, stream, sampling)


__all__ = ["COOKIE", "SAMPLING_KEYS", "ChatRequest", "CompletionRequest", "parse_chat", "parse_completion",
           "json_body", "caller_session_id", "cookie_session_id", "message_field", "stream_flag", "sampling_fields",
           "openai_messages"]
