"""The conversations of the web server in SQLite: they survive a restart (or live in memory with ``--no-persist``).

One file (``server.py`` puts it at ``--data-dir``/server.sqlite3, default
``$XDG_DATA_HOME/fishtune``, i.e. ``~/.local/share/fishtune``), or an
in-memory database (``--no-persist``): the same code and the same limits
either way.

Schema (``PRAGMA user_version = 1``)::

    sessions(id TEXT PRIMARY KEY, created REAL, last_used REAL, epoch INTEGER)
    turns(session_id TEXT REFERENCES sessions(id) ON DELETE CASCADE,
          seq INTEGER, question TEXT, answer TEXT, created REAL,
          PRIMARY KEY (session_id, seq))

Times are Unix seconds (``time.time``), so idle expiry counts across restarts.

Write ordering: a turn is written only once its answer is finished, as one
row (question and answer together) in one transaction, which also creates
the session on its first turn, drops its turns beyond ``max_turns``, expires
idle sessions and evicts the least recently used beyond ``max_sessions``. The
endpoints save a turn before the response completes (before the JSON answer,
or the final event of a stream); ``journal_mode=WAL`` with
``synchronous=FULL`` makes that commit durable, so a ``kill -9`` loses no
finished turn and an interrupted answer is never half-saved. A cancelled
answer is not saved at all.

Threads share one connection behind a lock (each operation is a few
milliseconds; generation takes seconds). "Used" means a turn was saved or the
session was cleared: reading a history does not keep a session alive.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from fishtune.errors import UserError
from fishtune.serve.errors import StoreError
from fishtune.serve.sessions import Conversation

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_last_used ON sessions (last_used);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"""


class SqliteSessionStore:
    """Session id -> finished turns, in SQLite; LRU-bounded, idle sessions expire, turns capped per session.

    ``path`` None: in memory (nothing survives the process). ``clock`` is
    injectable so expiry is tested without sleeping.
    """

    def __init__(self, path: str | Path | None = None, *, max_sessions: int = 1000, ttl_s: float = 3600.0,
                 max_turns: int = 20, clock: Callable[[], float] = time.time):
        if max_sessions < 1:
            raise UserError(f"max_sessions={max_sessions} must be at least 1")
        if ttl_s <= 0:
            raise UserError(f"session ttl={ttl_s} must be more than 0 seconds")
        if max_turns < 0:
            raise UserError(f"max_turns={max_turns} must be 0 or more")
        self.max_sessions, self.ttl_s, self.max_turns = int(max_sessions), float(ttl_s), int(max_turns)
        self.clock = clock
        self.path = Path(path) if path is not None else None
        self.evicted = 0
        self.expired = 0
        self._lock = threading.Lock()
        self._db = self._open()

    @property
    def name(self) -> str:
        """The file name, or ``memory`` (never an absolute path: it is shown by ``/api/health``)."""
        return self.path.name if self.path is not None else "memory"

    def _open(self) -> sqlite3.Connection:
        target = ":memory:"
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise UserError(f"can't create the data folder {self.path.parent} ({exc.strerror}); "
                                "pass another --data-dir, or --no-persist") from None
            target = str(self.path)
        try:
            db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
            if self.path is not None:
                db.execute("PRAGMA journal_mode=WAL")
                os.chmod(self.path, 0o600)  # conversations are private
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(f"{self.path} was written by a newer fishtune (schema {version}); "
                                "upgrade, or pass another --data-dir")
            db.executescript(SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path} is not a usable conversation store ({exc}); move it away "
                            "or pass another --data-dir") from None
        return db

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """The connection inside one transaction (writes: ``BEGIN IMMEDIATE``), under the lock."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                logger.error("conversation store %s: %s", self.name, exc)
                raise StoreError(f"the conversation store ({self.name}) failed: {exc}; "
                                 "try again, or check the disk under --data-dir") from None

    def _live(self, db: sqlite3.Connection, session_id: str) -> int | None:
        """The epoch of the live (not expired) session, or None."""
        row = db.execute("SELECT epoch FROM sessions WHERE id = ? AND last_used > ?",
                         (session_id, self.clock() - self.ttl_s)).fetchone()
        return None if row is None else int(row[0])

    def _expire_and_evict(self, db: sqlite3.Connection, now: float) -> None:
        self.expired += db.execute("DELETE FROM sessions WHERE last_used <= ?", (now - self.ttl_s,)).rowcount
        excess = db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] - self.max_sessions
        if excess > 0:
            self.evicted += db.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions ORDER BY last_used, rowid LIMIT ?)",
                (excess,)).rowcount
            logger.debug("session table full (%d): evicted %d", self.max_sessions, excess)

    def load(self, session_id: str | None) -> Conversation:
        """The session's finished turns, oldest first (none when unknown or expired)."""
        if session_id is None:
            return Conversation("")
        with self._transaction(write=False) as db:
            epoch = self._live(db, session_id)
            if epoch is None:
                return Conversation(session_id)
            rows = db.execute("SELECT question, answer FROM turns WHERE session_id = ? ORDER BY seq",
                              (session_id,)).fetchall()
        return Conversation(session_id, tuple((q, a) for q, a in rows), epoch)

    def add_turn(self, conversation: Conversation, question: str, answer: str) -> bool:
        """Save a finished turn (creating the session on its first one); False when it was cleared meanwhile."""
        sid = conversation.session_id
        with self._transaction(write=True) as db:
            now = self.clock()
            epoch = self._live(db, sid)
            if epoch is not None and epoch != conversation.epoch:
                logger.info("session %s was cleared while answering; the answer is not kept", sid[:6])
                return False
            if epoch is None:
                db.execute("DELETE FROM sessions WHERE id = ?", (sid,))  # an expired one starts afresh
                db.execute("INSERT INTO sessions (id, created, last_used, epoch) VALUES (?, ?, ?, 0)", (sid, now, now))
            else:
                db.execute("UPDATE sessions SET last_used = ? WHERE id = ?", (now, sid))
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM turns WHERE session_id = ?", (sid,)).fetchone()[0]
            db.execute("INSERT INTO turns (session_id, seq, question, answer, created) VALUES (?, ?, ?, ?, ?)",
                       (sid, seq, question, answer, now))
            db.execute("DELETE FROM turns WHERE session_id = ? AND seq <= ?", (sid, seq - self.max_turns))
            self._expire_and_evict(db, now)
        return True

    def clear(self, session_id: str | None) -> bool:
        """Forget the session's turns; False when there was no such (live) session."""
        if session_id is None:
            return False
        with self._transaction(write=True) as db:
            if self._live(db, session_id) is None:
                return False
            db.execute("DELETE FROM turns WHERE session_id = ?", (session_id,))
            db.execute("UPDATE sessions SET epoch = epoch + 1, last_used = ? WHERE id = ?", (self.clock(), session_id))
        return True

    def __len__(self) -> int:
        with self._transaction(write=False) as db:
            return db.execute("SELECT COUNT(*) FROM sessions WHERE last_used > ?",
                              (self.clock() - self.ttl_s,)).fetchone()[0]

    def stats(self) -> dict:
        return {"sessions": len(self), "max_sessions": self.max_sessions, "session_ttl_s": self.ttl_s,
                "max_turns": self.max_turns, "evicted": self.evicted, "expired": self.expired,
                "persisted": self.path is not None, "store": self.name}

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = ["SqliteSessionStore", "SCHEMA_VERSION"]
