"""Per-user chat histories for the web server: bounded, expiring, thread-safe.

Each session id maps to one :class:`fishtune.infer.chat.ChatSession` (its history is
already bounded by turns and by the prompt's token budget). The table itself
is bounded too: idle sessions expire after ``ttl_s`` seconds and, when more
than ``max_sessions`` are alive, the least recently used one is evicted. So
memory stays bounded however many clients come and go.

Every session carries its own lock: two requests of the same user are
answered one after the other (the history stays in order), requests of
different users never touch each other's history.

The endpoints use the table only through :class:`SessionStorage` (look up,
create, add a turn, read, clear, stats), so another store (e.g. SQLite) can
replace the in-memory :class:`SessionStore` without touching them.
"""
from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

from fishtune.errors import UserError
from fishtune.infer.chat import ChatSession

logger = logging.getLogger(__name__)

# Ids we hand out are token_urlsafe(18) (24 chars); clients may pick their own
# within the same alphabet (curl users, chat UIs), long enough not to collide by accident.
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


def check_session_id(value: object) -> str:
    """A client-supplied session id, or UserError naming the rule."""
    if not isinstance(value, str) or not SESSION_ID_RE.match(value):
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
        raise UserError(
            f"session_id {shown!r} is invalid; use 8-64 characters from A-Z a-z 0-9 _ - "
            "(or leave it out to get a new session)"
        )
    return value


@dataclass
class SessionEntry:
    """One user's chat: the history, a lock for its turns, when it was last used."""

    session_id: str
    chat: ChatSession
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: float = 0.0
    last_used: float = 0.0


class SessionStorage(Protocol):
    """What the endpoints need from a session table."""

    def get(self, session_id: str | None) -> SessionEntry | None: ...

    def get_or_create(self, session_id: str | None) -> SessionEntry: ...

    def add_turn(self, entry: SessionEntry, question: str, answer: str) -> None: ...

    def history(self, session_id: str | None) -> list[dict[str, str]]: ...

    def clear(self, session_id: str | None) -> bool: ...

    def stats(self) -> dict: ...


class SessionStore:
    """Session id -> :class:`SessionEntry`, in memory, LRU-bounded with idle expiry.

    ``factory()`` builds a fresh ChatSession. ``clock`` is injectable so the
    expiry can be tested without sleeping.
    """

    def __init__(
        self,
        factory: Callable[[], ChatSession],
        max_sessions: int = 1000,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_sessions < 1:
            raise UserError(f"max_sessions={max_sessions} must be at least 1")
        if ttl_s <= 0:
            raise UserError(f"session ttl={ttl_s} must be more than 0 seconds")
        self.factory = factory
        self.max_sessions = int(max_sessions)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()  # oldest use first
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        with self._lock:
            self._expire(self.clock())
            return len(self._entries)

    def _expire(self, now: float) -> None:
        # Entries are ordered by last use, so the expired ones are at the front.
        while self._entries:
            sid, entry = next(iter(self._entries.items()))
            if now - entry.last_used < self.ttl_s:
                break
            del self._entries[sid]
            self.expired += 1
            logger.debug("session %s expired", sid[:6])

    def get(self, session_id: str | None) -> SessionEntry | None:
        """The live session, or None (unknown or expired); counts as a use."""
        if session_id is None:
            return None
        with self._lock:
            now = self.clock()
            self._expire(now)
            entry = self._entries.get(session_id)
            if entry is not None:
                entry.last_used = now
                self._entries.move_to_end(session_id)
            return entry

    def get_or_create(self, session_id: str | None) -> SessionEntry:
        """The session for ``session_id`` (created when unknown; a new id when None)."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            if session_id is None:
                session_id = new_session_id()
            entry = self._entries.get(session_id)
            if entry is None:
                entry = SessionEntry(session_id, self.factory(), created=now, last_used=now)
                self._entries[session_id] = entry
                while len(self._entries) > self.max_sessions:
                    old, _ = self._entries.popitem(last=False)
                    self.evicted += 1
                    logger.debug("session table full (%d): evicted %s", self.max_sessions, old[:6])
            else:
                entry.last_used = now
                self._entries.move_to_end(session_id)
            return entry

    def add_turn(self, entry: SessionEntry, question: str, answer: str) -> None:
        """Record an answered turn (the caller holds ``entry.lock``)."""
        entry.chat.add_turn(question, answer)

    def history(self, session_id: str | None) -> list[dict[str, str]]:
        """The session's turns as chat messages, without the system prompt ([] when unknown)."""
        entry = self.get(session_id)
        return [m for m in entry.chat.messages if m["role"] != "system"] if entry else []

    def clear(self, session_id: str | None) -> bool:
        """Forget the history of ``session_id``; False when there was none."""
        entry = self.get(session_id)
        if entry is None:
            return False
        with entry.lock:
            entry.chat.clear()
        return True

    def stats(self) -> dict:
        with self._lock:
            self._expire(self.clock())
            return {"sessions": len(self._entries), "max_sessions": self.max_sessions,
                    "session_ttl_s": self.ttl_s, "evicted": self.evicted, "expired": self.expired}


__all__ = ["SessionStorage", "SessionStore", "SessionEntry", "check_session_id", "new_session_id", "SESSION_ID_RE"]
