"""What the endpoints share: the limits (:class:`ServerConfig`) and the app's parts (:class:`ServerState`).

:func:`fishtune.serve.app.create_app` builds one :class:`ServerState` and
keeps it in ``app.extensions``; an endpoint reaches it with :func:`current`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flask import current_app

from fishtune.errors import UserError
from fishtune.infer.chat import ChatSession
from fishtune.infer.generation import SamplingConfig
from fishtune.serve.backends import Backend
from fishtune.serve.security import HostPolicy
from fishtune.serve.sessions import SessionLocks, SessionStorage
from fishtune.serve.streaming import Generation

EXTENSION = "fishtune"


@dataclass
class ServerConfig:
    """Sampling defaults and request limits."""

    sampling: SamplingConfig
    max_message_chars: int = 2000
    max_body_bytes: int = 64 * 1024
    max_tokens_limit: int = 4096
    max_turns: int = 20
    queue_timeout_s: float = 300.0
    vocab_size: int | None = None  # the back end's; top_k must stay below it
    model_names: tuple[str, ...] = ()  # what ``model`` may say on /v1 (the first is the back end's)

    def __post_init__(self) -> None:
        if self.max_message_chars < 1:
            raise UserError(f"max_message_chars={self.max_message_chars} must be at least 1")
        if self.sampling.max_tokens > self.max_tokens_limit:
            raise UserError(f"--max-tokens {self.sampling.max_tokens} is over the server limit of "
                            f"{self.max_tokens_limit}")
        if self.vocab_size is not None and self.sampling.top_k >= self.vocab_size:
            raise UserError(f"--top-k {self.sampling.top_k} is not below the model's vocabulary of "
                            f"{self.vocab_size} tokens; use 0 (off) or at most {self.vocab_size - 1}")

    @property
    def max_openai_content_chars(self) -> int:
        """Longest content of one OpenAI message (it may carry earlier turns or a system prompt)."""
        return self.max_message_chars * 4


@dataclass
class ServerState:
    config: ServerConfig
    backend: Backend
    sessions: SessionStorage
    locks: SessionLocks
    generation: Generation
    hosts: HostPolicy
    new_chat: Callable[[], ChatSession]  # an empty conversation with the back end's template and budget


def current() -> ServerState:
    """The state of the app serving this request."""
    return current_app.extensions[EXTENSION]


__all__ = ["ServerConfig", "ServerState", "current", "EXTENSION"]
