"""Sessions of the web server: ids, what a store must offer (:class:`SessionStorage`), a lock per session.

A session is one user's conversation: its id (the ``fishtune_session`` cookie,
or ``session_id`` in the request) and its finished turns. The store
(:class:`fishtune.serve.store.SqliteSessionStore`: a file under ``--data-dir``,
or memory with ``--no-persist``) bounds them (sessions LRU, idle expiry, turns
per session). A session exists in the store only once it has a finished turn:
looking one up never creates it, so requests that fail validation leave no
trace.

:class:`SessionLocks` keeps a user's turns in order: two requests of the same
session are answered one after the other, requests of different sessions
never wait for each other. Only sessions with a request in flight hold a lock,
so the table stays as small as the number of requests.
"""
from __future__ import annotations

import contextlib
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

from fishtune.errors import UserError, clip
from fishtune.serve.errors import ApiError

# Ids we hand out are token_urlsafe(18) (24 chars); clients may pick their own
# within the same alphabet (curl users, chat UIs), long enough not to collide by accident.
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


def check_session_id(value: object) -> str:
    """A client-supplied session id, or UserError naming the rule (the whole value must match)."""
    if not isinstance(value, str) or not SESSION_ID_RE.fullmatch(value):
        shown = clip(value) if isinstance(value, str) else value
        raise UserError(
            f"session_id {shown!r} is invalid; use 8-64 characters from A-Z a-z 0-9 _ - "
            "(or leave it out to get a new session)"
        )
    return value


@dataclass(frozen=True)
class Conversation:
    """A session's finished turns as read from the store.

    ``epoch`` counts the clears of the session: a turn is saved only while it
    is unchanged, so an answer that was being written when the user cleared
    the conversation does not come back into it.
    """

    session_id: str
    turns: tuple[tuple[str, str], ...] = ()
    epoch: int = 0

    def messages(self) -> list[dict[str, str]]:
        """The turns as chat messages (no system prompt)."""
        out: list[dict[str, str]] = []
        for q, a in self.turns:
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return out


class SessionStorage(Protocol):
    """What the endpoints need from a session store."""

    def load(self, session_id: str | None) -> Conversation: ...

    def add_turn(self, conversation: Conversation, question: str, answer: str) -> bool: ...

    def clear(self, session_id: str | None) -> bool: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class SessionLocks:
    """One lock per session with a request in flight; waiters time out with 503."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, list] = {}  # session id -> [lock, requests holding or waiting]

    @contextlib.contextmanager
    def hold(self, session_id: str, timeout_s: float) -> Iterator[None]:
        """The session's lock for one answer: a user's turns are answered in order."""
        with self._lock:
            entry = self._held.setdefault(session_id, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=timeout_s):
                raise ApiError(503, "this session is busy with another answer; try again later")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._held[session_id]


__all__ = ["Conversation", "SessionStorage", "SessionLocks", "check_session_id", "new_session_id", "SESSION_ID_RE"]
