"""Generation for the endpoints: the gate, the one streaming path, a WSGI body that always cleans up.

* :class:`Generation` is the endpoints' only way to a back end: ``answer``
  (the whole answer) or ``stream`` (a context manager around a started
  :class:`LiveStream`). It holds the :class:`GenerationGate` when the back
  end needs one (``Backend.serialize``: an MLX or llama.cpp model is not
  thread-safe, so requests queue for it); a back end that queues or batches
  requests itself (Ollama) sets ``serialize = False`` and the gate lets every
  request through.
* :func:`event_stream` is the one streaming path, for both wire formats of
  :mod:`fishtune.serve.events`: it stops generation when the client goes
  away and turns a failure after the first byte into an error event.
* :class:`StreamBody` is the WSGI body: its ``close`` (which the server
  always calls) closes the event stream, then the request's
  :class:`contextlib.ExitStack` (generation, gate, session lock), even when
  the body was never iterated.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator, Protocol

from flask import Response, request

from fishtune.errors import UserError
from fishtune.infer.generation import GenerationChunk, GenerationResult, SamplingConfig
from fishtune.serve.backends import Backend, BackendError, Messages
from fishtune.serve.errors import ApiError
from fishtune.serve.events import error_event

logger = logging.getLogger(__name__)

DISCONNECTED_LOG = "client disconnected; stopping generation"


class GenerationGate:
    """One generation at a time (when the back end needs it); waiters time out with 503."""

    def __init__(self, serialize: bool, timeout_s: float):
        self._lock = threading.Lock() if serialize else None
        self.timeout_s = timeout_s
        self.waiting = 0
        self._count_lock = threading.Lock()

    def acquire(self) -> None:
        if self._lock is None:
            return
        with self._count_lock:
            self.waiting += 1
        try:
            ok = self._lock.acquire(timeout=self.timeout_s)
        finally:
            with self._count_lock:
                self.waiting -= 1
        if not ok:
            raise ApiError(503, f"server busy: no generation slot within {self.timeout_s:g} s; try again later")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "GenerationGate":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def busy(self) -> bool:
        return self._lock is not None and self._lock.locked()


class LiveStream:
    """A started generation. The first chunk is fetched at once, so a failure to start is an HTTP error."""

    def __init__(self, chunks: Iterator[GenerationChunk], cancel: threading.Event):
        self._chunks = chunks
        self.cancel = cancel
        self._first = next(chunks, None)

    def chunks(self, disconnected: Callable[[], bool] | None = None) -> Iterator[GenerationChunk]:
        """The chunks up to the final one; ``disconnected()`` (waitress's check) true cancels generation."""
        chunk = self._first
        while chunk is not None:
            yield chunk
            if chunk.finish_reason is not None:
                return
            if disconnected is not None and disconnected():
                logger.info(DISCONNECTED_LOG)
                self.cancel.set()
            chunk = next(self._chunks, None)


class Generation:
    """The back end behind its gate: the endpoints' only access to generation.

    The gate is the one place that knows requests take turns: a back end
    that batches concurrent requests (or queues them, like Ollama) sets
    ``serialize = False`` and does its own scheduling behind ``stream_chat``
    and ``chat``; the endpoints stay as they are.
    """

    def __init__(self, backend: Backend, queue_timeout_s: float):
        self.backend = backend
        self.gate = GenerationGate(backend.serialize, queue_timeout_s)

    def answer(self, messages: Messages, sampling: SamplingConfig) -> GenerationResult:
        with self.gate:
            return self.backend.chat(messages, sampling)

    @contextlib.contextmanager
    def stream(self, messages: Messages, sampling: SamplingConfig) -> Iterator[LiveStream]:
        """A started stream, holding the gate; leaving cancels and closes the generation, then frees the gate."""
        with self.gate, contextlib.ExitStack() as stack:
            cancel = threading.Event()
            chunks = stack.enter_context(contextlib.closing(self.backend.stream_chat(messages, sampling, cancel)))
            stack.callback(cancel.set)
            yield LiveStream(chunks, cancel)

    def stats(self) -> dict[str, int | bool]:
        return {"busy": self.gate.busy, "waiting": self.gate.waiting}


class EventFormat(Protocol):
    """How a stream looks on the wire (:mod:`fishtune.serve.events`)."""

    def opening(self) -> list[str]: ...

    def delta(self, text: str) -> str: ...

    def finish(self, reason: str) -> str: ...

    def closing(self) -> list[str]: ...


def event_stream(live: LiveStream, fmt: EventFormat, disconnected: Callable[[], bool] | None = None,
                 on_finish: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """The events of ``live`` in ``fmt``; ``on_finish(finish_reason, text)`` runs before the final event."""
    yield from fmt.opening()
    parts: list[str] = []
    try:
        for chunk in live.chunks(disconnected):
            if chunk.text:
                parts.append(chunk.text)
                yield fmt.delta(chunk.text)
            if chunk.finish_reason is not None:
                if on_finish is not None:
                    on_finish(chunk.finish_reason, "".join(parts))
                yield fmt.finish(chunk.finish_reason)
                break
    except GeneratorExit:  # the server closed the body early: the client went away
        logger.info(DISCONNECTED_LOG)
        raise
    except (BackendError, UserError) as exc:
        logger.warning("stream failed: %s", exc)
        yield error_event(str(exc))
    except Exception:
        logger.exception("stream failed")
        yield error_event("internal error")
    yield from fmt.closing()


class StreamBody:
    """A WSGI body whose ``close`` always runs ``cleanup``, even if it was never iterated.

    Why not a bare generator with a ``finally``: closing a generator that
    never started skips its ``finally``, which would leak the gate.
    """

    def __init__(self, events: Iterator[str], cleanup: contextlib.ExitStack):
        self._events = events
        self._cleanup = cleanup

    def __iter__(self) -> "StreamBody":
        return self

    def __next__(self) -> bytes:
        return next(self._events).encode("utf-8")

    def close(self) -> None:
        with self._cleanup:  # runs every callback even if closing the events fails
            self._events.close()


def sse_response(live: LiveStream, fmt: EventFormat, held: contextlib.ExitStack,
                 on_finish: Callable[[str, str], None] | None = None) -> Response:
    """The streamed answer. It takes over what ``held`` holds (generation, gate, session lock)."""
    events = event_stream(live, fmt, request.environ.get("waitress.client_disconnected"), on_finish)
    return Response(StreamBody(events, held.pop_all()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["GenerationGate", "Generation", "LiveStream", "EventFormat", "event_stream", "StreamBody", "sse_response"]
