"""What answers look like on the wire: the seed's API and OpenAI's, whole or as Server-Sent Events.

Both formats fill the same four slots of :func:`fishtune.serve.streaming.event_stream`
(``opening``, ``delta``, ``finish``, ``closing``) and build the non-streamed
answer from a :class:`~fishtune.infer.generation.GenerationResult`:

* :class:`SeedEvents` (``POST /api/chat``): ``data: {"delta": "..."}`` ...
  ``data: {"done": true, "finish_reason": ..., "session_id": ...}``;
  whole: ``{"response": "...", "session_id": "..."}``.
* :class:`OpenAIEvents` (``POST /v1/chat/completions``): ``chat.completion.chunk``
  objects, then ``data: [DONE]``; whole: one ``chat.completion``.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fishtune.infer.generation import GenerationResult

SSE_DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_event(message: str) -> str:
    """The event that ends a stream that failed after it started (both formats)."""
    return sse({"error": message})


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

    def finish(self, reason: str) -> str:
        return sse({"done": True, "finish_reason": reason, "session_id": self.session_id})

    def closing(self) -> list[str]:
        return []


def openai_finish(reason: str) -> str:
    """OpenAI's finish_reason for ours: ``length`` stays, everything else is ``stop``."""
    return "length" if reason == "length" else "stop"


class OpenAIEvents:
    """One OpenAI ``chat.completion`` (its id and creation time are fixed here)."""

    def __init__(self, model: str):
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, result: GenerationResult) -> dict[str, Any]:
        return {
            **self._head("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": openai_finish(result.finish_reason)}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generation_tokens,
                      "total_tokens": result.prompt_tokens + result.generation_tokens},
        }

    def _chunk(self, delta: dict[str, str], finish: str | None) -> str:
        return sse({**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def opening(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def delta(self, text: str) -> str:
        return self._chunk({"content": text}, None)

    def finish(self, reason: str) -> str:
        return self._chunk({}, openai_finish(reason))

    def closing(self) -> list[str]:
        return [SSE_DONE]


__all__ = ["SeedEvents", "OpenAIEvents", "openai_finish", "sse", "error_event", "SSE_DONE"]
