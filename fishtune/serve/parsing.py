"""Request parsing and validation: everything HTTP- or OpenAI-specific about a request.

The JSON body (size, Content-Type, encoding, shape, numbers too long to
parse), the ``message`` field, the ``stream`` flag, per-request sampling
(``top_k`` below the vocabulary), OpenAI's ``model``, ``messages`` (content
parts, size, the roles we support), ``stop``, ``stream_options`` and the
options we don't support (``tools``, ``response_format``, ...: a 400 that
says so rather than silence), and the caller's session id (JSON body, the
query string of a GET, cookie). The conversation rules themselves (roles
alternate, the last turn is the user's) are
:func:`fishtune.template.check_messages`. Every problem is an
:class:`~fishtune.serve.errors.ApiError` (or a UserError, also a 400) that
names the field.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any

from flask import request

from fishtune.errors import UserError, clip
from fishtune.infer.generation import SamplingConfig, ensure_utf8
from fishtune.serve.errors import ApiError
from fishtune.serve.sessions import check_session_id
from fishtune.serve.state import ServerConfig
from fishtune.template import check_messages

COOKIE = "fishtune_session"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")
OPENAI_ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 100
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300  # Python refuses to parse longer integer literals
# OpenAI fields we can't honour: (field, is the value harmless?, what to do instead)
UNSUPPORTED = (
    ("tools", lambda v: not v, "this model has no tool calling; leave it out"),
    ("functions", lambda v: not v, "this model has no tool calling; leave it out"),
    ("tool_choice", lambda v: v in (None, "none", "auto"), "this model has no tool calling; leave it out"),
    ("function_call", lambda v: v in (None, "none", "auto"), "this model has no tool calling; leave it out"),
    ("response_format", lambda v: v is None or v == {"type": "text"},
     'only {"type": "text"} is supported (no JSON mode); leave it out'),
    ("logprobs", lambda v: v in (None, False), "log-probabilities are not returned; leave it out"),
    ("top_logprobs", lambda v: v in (None, 0), "log-probabilities are not returned; leave it out"),
    ("logit_bias", lambda v: not v, "logit bias is not supported; leave it out"),
    ("presence_penalty", lambda v: v in (None, 0), "use repetition_penalty (1 = off) instead"),
    ("frequency_penalty", lambda v: v in (None, 0), "use repetition_penalty (1 = off) instead"),
)


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

    model: str  # the name the answer carries (the one asked for, or the back end's)
    messages: list[dict[str, str]]
    stream: bool
    sampling: SamplingConfig
    stop: tuple[str, ...]
    include_usage: bool


class HugeNumber:
    """An integer literal too long for Python's ``int`` (the JSON parser's stand-in, refused by field)."""

    def __init__(self, digits: int):
        self.digits = digits


def parse_int(literal: str) -> int | HugeNumber:
    digits = len(literal.lstrip("-"))
    return HugeNumber(digits) if digits > MAX_INT_DIGITS else int(literal)


def find_huge_number(body: dict[str, Any]) -> None:
    """An ApiError naming the first field that holds a :class:`HugeNumber` (walked without recursion)."""
    todo: list[tuple[str, Any]] = list(body.items())
    while todo:
        path, value = todo.pop()
        if isinstance(value, HugeNumber):
            raise ApiError(400, f'field "{path}" is an integer with {value.digits} digits; no field takes a number '
                                "that large, send one in its range", param=path)
        if isinstance(value, dict):
            todo += [(f"{path}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(f"{path}[{i}]", v) for i, v in enumerate(value)]


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
        body = json.loads(data.decode("utf-8"), parse_int=parse_int)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # e.g. [[[[...]]]] 30000 deep: still under the size limit
        raise ApiError(400, "request body is JSON nested too deeply; send a flat object like {\"message\": \"你好\"}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    find_huge_number(body)
    return body


def cookie_session_id() -> str | None:
    """The session id in the cookie; None when there is none or it is malformed."""
    cookie = request.cookies.get(COOKIE)
    try:
        return check_session_id(cookie) if cookie else None
    except UserError:
        return None


def caller_session_id(body: dict[str, Any]) -> tuple[str | None, bool]:
    """(session id, came from the request itself). The JSON body, then (GET only) ``?session_id=``, then the cookie.

    A POST must carry its session id in its JSON body: a query string can be
    put in a link or a form by another page.
    """
    arg = request.args.get("session_id")
    if arg is not None and request.method == "POST":
        raise ApiError(400, '"session_id" in the query string is not accepted on POST; send it in the JSON body, '
                            'e.g. {"session_id": "..."}', param="session_id")
    if body.get("session_id") is not None:
        return check_session_id(body["session_id"]), True
    if arg is not None:
        return check_session_id(arg), True
    return cookie_session_id(), False


def message_field(body: dict[str, Any], max_chars: int) -> str:
    if "message" not in body:
        raise ApiError(400, 'field "message" is missing; send {"message": "your question"}')
    msg = body["message"]
    if not isinstance(msg, str):
        raise ApiError(400, f'field "message" must be a string, got {type(msg).__name__}')
    msg = ensure_utf8(msg.strip(), 'field "message"')
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
    """The server's sampling defaults with the request's fields over them."""
    over = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
    if openai and body.get("max_completion_tokens") is not None:
        over["max_tokens"] = body["max_completion_tokens"]
    s = dataclasses.replace(cfg.sampling, **over) if over else cfg.sampling  # validates -> UserError
    if s.max_tokens > cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens={s.max_tokens} is over this server's limit of {cfg.max_tokens_limit}")
    if cfg.vocab_size is not None and s.top_k >= cfg.vocab_size:
        raise ApiError(400, f"top_k={s.top_k} is not below the vocabulary size of {cfg.vocab_size}; "
                            f"use 0 (off) or an integer in [1, {cfg.vocab_size - 1}]", param="top_k")
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
    return {"role": m["role"], "content": ensure_utf8(content, f"messages[{i}].content")}


def openai_messages(body: dict[str, Any], cfg: ServerConfig) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, 'field "messages" must be a non-empty list of {"role", "content"} objects')
    out = [openai_message(i, m, cfg.max_openai_content_chars) for i, m in enumerate(msgs)]
    check_messages(out, end="user", label="messages")  # alternation, last is the user's -> UserError (400)
    return out


def openai_model(body: dict[str, Any], cfg: ServerConfig) -> str:
    """The ``model`` asked for: one this server serves (404 in OpenAI's shape otherwise), or its own when left out."""
    model = body.get("model")
    if model is None:
        return cfg.model_names[0]
    if model not in cfg.model_names:
        shown = clip(model) if isinstance(model, str) else model
        raise ApiError(404, f"The model {shown!r} does not exist; this server serves {', '.join(cfg.model_names)} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    return model


def stop_field(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f'field "stop" must be a string or a list of at most {MAX_STOPS} non-empty strings of at '
                            f"most {MAX_STOP_CHARS} characters", param="stop")
    return tuple(ensure_utf8(s, 'field "stop"') for s in stops)


def include_usage_field(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise ApiError(400, 'field "stream_options" is only for "stream": true; leave it out', param="stream_options")
    usage = opts.get("include_usage", False) if isinstance(opts, dict) else None
    if not isinstance(usage, bool):
        raise ApiError(400, 'field "stream_options" must be an object like {"include_usage": true}',
                       param="stream_options")
    return usage


def refuse_unsupported(body: dict[str, Any]) -> None:
    for name, harmless, hint in UNSUPPORTED:
        if not harmless(body.get(name)):
            raise ApiError(400, f'field "{name}" is not supported by this server: {hint}', param=name)


def parse_chat(cfg: ServerConfig) -> ChatRequest:
    body = json_body()
    message = message_field(body, cfg.max_message_chars)
    stream = stream_flag(body)
    sampling = sampling_fields(body, cfg)
    session_id, from_body = caller_session_id(body)
    return ChatRequest(message, stream, sampling, session_id, from_body)


def parse_completion(cfg: ServerConfig) -> CompletionRequest:
    body = json_body()
    model = openai_model(body, cfg)
    messages = openai_messages(body, cfg)
    stream = stream_flag(body)
    sampling = sampling_fields(body, cfg, openai=True)
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n={n!r} is not supported; this server returns one choice (n=1)", param="n")
    refuse_unsupported(body)
    return CompletionRequest(model, messages, stream, sampling, stop_field(body), include_usage_field(body, stream))


__all__ = ["COOKIE", "SAMPLING_KEYS", "ChatRequest", "CompletionRequest", "parse_chat", "parse_completion",
           "json_body", "caller_session_id", "cookie_session_id", "message_field", "stream_flag", "sampling_fields",
           "openai_messages", "openai_model", "stop_field", "HugeNumber"]
