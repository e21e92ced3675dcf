"""What answers and errors look like on the wire: the seed's API and OpenAI's, whole or as Server-Sent Events.

Both formats fill the same five slots of :func:`fishtune.serve.streaming.event_stream`
(``opening``, ``delta``, ``finish``, ``error``, ``closing``) and build the
non-streamed answer from a :class:`~fishtune.infer.generation.GenerationResult`:

* :class:`SeedEvents` (``POST /api/chat``): ``data: {"delta": "..."}`` ...
  ``data: {"done": true, "finish_reason": ..., "session_id": ...}``;
  whole: ``{"response": "...", "session_id": "..."}``; a failure after the
  first byte: ``data: {"error": "..."}``.
* :class:`OpenAIEvents` (``POST /v1/chat/completions``): ``chat.completion.chunk``
  objects (with ``stream_options.include_usage``, a last chunk with no
  choices and the ``usage``), then ``data: [DONE]``; whole: one
  ``chat.completion``; a failure: ``data: {"error": {...}}`` in OpenAI's shape.

:func:`error_payload` is the one error body: ``{"error": "..."}``, or under
``/v1/`` OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fishtune.infer.generation import GenerationChunk, GenerationResult

SSE_DONE = "data: [DONE]\n\n"
OPENAI_PREFIX = "/v1/"


def sse(obj: Any) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def openai_error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "permission_error" if status == 403 else "invalid_request_error"


def error_payload(message: str, status: int, path: str, param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error on ``path``: the seed's shape, or OpenAI's under ``/v1/``."""
    if path.startswith(OPENAI_PREFIX):
        return {"error": {"message": message, "type": openai_error_type(status), "param": param, "code": code}}
    return {"error": message}


class SeedEvents:
    """The seed's ``/api/chat`` answer for one session."""

    def __init__(self, session_id: str):
        self.session_id = session_id

    def response(self, result: GenerationResult) -> dict[str, Any]:
        return {"response": result.text, "session_id": self.session_id}

    def opening(self) -> list[str]:
        return []

    def delta(self, text: str) -> str:
        return sse({"delta": text})

    def finish(self, final: GenerationChunk) -> list[str]:
        return [sse({"done": True, "finish_reason": final.finish_reason, "session_id": self.session_id})]

    def error(self, message: str, status: int) -> str:
        return sse({"error": message})

    def closing(self) -> list[str]:
        return []


def openai_finish(reason: str) -> str:
    """OpenAI's finish_reason for ours: ``length`` stays, everything else is ``stop``."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class OpenAIEvents:
    """One OpenAI ``chat.completion`` (its id and creation time are fixed here)."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, result: GenerationResult) -> dict[str, Any]:
        return {
            **self._head("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": openai_finish(result.finish_reason)}],
            "usage": usage(result.prompt_tokens, result.generation_tokens),
        }

    def _chunk(self, delta: dict[str, str], finish: str | None) -> str:
        extra = {"usage": None} if self.include_usage else {}
        return sse({**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    def opening(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def delta(self, text: str) -> str:
        return self._chunk({"content": text}, None)

    def finish(self, final: GenerationChunk) -> list[str]:
        out = [self._chunk({}, openai_finish(final.finish_reason or "stop"))]
        if self.include_usage:
            out.append(sse({**self._head("chat.completion.chunk"), "choices": [],
                            "usage": usage(final.prompt_tokens, final.generation_tokens)}))
        return out

    def error(self, message: str, status: int) -> str:
        return sse(error_payload(message, status, OPENAI_PREFIX))

    def closing(self) -> list[str]:
        return [SSE_DONE]


__all__ = ["SeedEvents", "OpenAIEvents", "openai_finish", "sse", "error_payload", "usage", "SSE_DONE",
           "OPENAI_PREFIX"]
