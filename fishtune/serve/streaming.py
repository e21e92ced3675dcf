"""Generation for the endpoints: admission, client watch, the gate, the one streaming path, a WSGI body that cleans up.

* :class:`Generation` is the endpoints' only way to a back end: ``answer``
  (the whole answer) or ``stream`` (a context manager around a started
  :class:`LiveStream`). Each request first takes a slot (:class:`Admission`):
  at most ``max_active`` requests generate or wait for generation at once,
  each holding one waitress thread, so the other threads stay free for the
  cheap endpoints (page, health, history, clear); one more is refused with a
  503 at once. Then its client is watched (:class:`DisconnectMonitor`: a
  client that goes away cancels its generation, streamed or not). Then the
  :class:`GenerationGate`, when the back end needs one (``Backend.serialize``:
  llama.cpp runs one request at a time); the MLX back end batches requests
  itself and Ollama queues them, so for them the gate lets every request through.
* :func:`event_stream` is the one streaming path, for both wire formats of
  :mod:`fishtune.serve.events`: it turns a failure after the first byte into
  an error event of that format.
* :class:`StreamBody` is the WSGI body: its ``close`` (which the server
  always calls) closes the event stream, then the request's
  :class:`contextlib.ExitStack` (generation, gate, slot, session lock), even
  when the body was never iterated.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator, Protocol, Sequence

from flask import Response, request

from fishtune.errors import UserError
from fishtune.infer.generation import GenerationChunk, GenerationResult, SamplingConfig
from fishtune.serve.backends import Backend, Messages
from fishtune.serve.errors import ApiError, BackendError, StoreError

logger = logging.getLogger(__name__)

DISCONNECTED_LOG = "client disconnected; stopping generation"
WATCH_INTERVAL_S = 0.2


class Admission:
    """At most ``limit`` requests in generation (running or waiting); one more gets a 503 at once."""

    def __init__(self, limit: int):
        if limit < 1:
            raise UserError(f"max_active={limit} must be at least 1")
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.active >= self.limit:
                raise ApiError(503, f"server busy: {self.active} answers are being generated, the most it runs at "
                                    "once; try again in a few seconds")
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1


class DisconnectMonitor:
    """One thread that checks the clients of the requests in generation and cancels those whose client left.

    ``disconnected`` is waitress's ``environ["waitress.client_disconnected"]``
    (it works while the request runs because the server reads ahead,
    ``channel_request_lookahead``); a non-streamed request has no write that
    could fail, so without this check it would generate for nobody.
    """

    def __init__(self, interval_s: float = WATCH_INTERVAL_S):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[Callable[[], bool], threading.Event]] = {}
        self._count = 0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, disconnected: Callable[[], bool] | None, cancel: threading.Event) -> Iterator[None]:
        if disconnected is None:  # not under waitress (Flask's test client)
            yield
            return
        with self._lock:
            self._count += 1
            key = self._count
            self._watched[key] = (disconnected, cancel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="client-watch", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                del self._watched[key]

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                watched = list(self._watched.values())
            for disconnected, cancel in watched:
                if not cancel.is_set() and disconnected():
                    logger.info(DISCONNECTED_LOG)
                    cancel.set()


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


class LiveStream:
    """A started generation. The first chunk is fetched at once, so a failure to start is an HTTP error."""

    def __init__(self, chunks: Iterator[GenerationChunk]):
        self._chunks = chunks
        self._first = next(chunks, None)

    def chunks(self) -> Iterator[GenerationChunk]:
        """The chunks up to the final one."""
        chunk = self._first
        while chunk is not None:
            yield chunk
            if chunk.finish_reason is not None:
                return
            chunk = next(self._chunks, None)


class Generation:
    """The back end behind admission, the client watch and the gate: the endpoints' only access to generation."""

    def __init__(self, backend: Backend, queue_timeout_s: float, max_active: int):
        self.backend = backend
        self.gate = GenerationGate(backend.serialize, queue_timeout_s)
        self.admission = Admission(max_active)
        self.monitor = DisconnectMonitor()

    @contextlib.contextmanager
    def _turn(self, disconnected: Callable[[], bool] | None) -> Iterator[threading.Event]:
        """A slot, the client watched, the gate: the ``cancel`` event of one generation."""
        cancel = threading.Event()
        with self.admission.slot(), self.monitor.watch(disconnected, cancel), self.gate:
            yield cancel

    def answer(self, messages: Messages, sampling: SamplingConfig, stop: Sequence[str] = (),
               disconnected: Callable[[], bool] | None = None) -> GenerationResult:
        with self._turn(disconnected) as cancel:
            return self.backend.chat(messages, sampling, cancel, stop)

    @contextlib.contextmanager
    def stream(self, messages: Messages, sampling: SamplingConfig, stop: Sequence[str] = (),
               disconnected: Callable[[], bool] | None = None) -> Iterator[LiveStream]:
        """A started stream; leaving cancels and closes the generation, then frees the gate and the slot."""
        with self._turn(disconnected) as cancel, contextlib.ExitStack() as stack:
            chunks = stack.enter_context(contextlib.closing(self.backend.stream_chat(messages, sampling, cancel, stop)))
            stack.callback(cancel.set)
            yield LiveStream(chunks)

    def stats(self) -> dict[str, int | bool]:
        return {"busy": self.admission.active > 0, "generating": self.admission.active,
                "max_generating": self.admission.limit, "waiting": self.gate.waiting, **self.backend.stats()}


class EventFormat(Protocol):
    """How a stream looks on the wire (:mod:`fishtune.serve.events`)."""

    def opening(self) -> list[str]: ...

    def delta(self, text: str) -> str: ...

    def finish(self, final: GenerationChunk) -> list[str]: ...

    def error(self, message: str, status: int) -> str: ...

    def closing(self) -> list[str]: ...


def event_stream(live: LiveStream, fmt: EventFormat,
                 on_finish: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """The events of ``live`` in ``fmt``; ``on_finish(finish_reason, text)`` runs before the final event."""
    yield from fmt.opening()
    parts: list[str] = []
    try:
        for chunk in live.chunks():
            if chunk.text:
                parts.append(chunk.text)
                yield fmt.delta(chunk.text)
            if chunk.finish_reason is not None:
                if on_finish is not None:
                    on_finish(chunk.finish_reason, "".join(parts))
                yield from fmt.finish(chunk)
                break
    except GeneratorExit:  # the server closed the body early: the client went away
        logger.info(DISCONNECTED_LOG)
        raise
    except UserError as exc:
        yield fmt.error(str(exc), 400)
    except (BackendError, StoreError) as exc:
        logger.warning("stream failed: %s", exc)
        yield fmt.error(str(exc), exc.status)
    except Exception:
        logger.exception("stream failed")
        yield fmt.error("internal error", 500)
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


def client_disconnected() -> Callable[[], bool] | None:
    """waitress's check of this request's client (None outside waitress)."""
    return request.environ.get("waitress.client_disconnected")


def sse_response(live: LiveStream, fmt: EventFormat, held: contextlib.ExitStack,
                 on_finish: Callable[[str, str], None] | None = None) -> Response:
    """The streamed answer. It takes over what ``held`` holds (generation, gate, slot, session lock)."""
    return Response(StreamBody(event_stream(live, fmt, on_finish), held.pop_all()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["Admission", "DisconnectMonitor", "GenerationGate", "Generation", "LiveStream", "EventFormat",
           "event_stream", "StreamBody", "client_disconnected", "sse_response"]
