"""Continuous batching for the MLX back end: one thread owns the model and decodes every request together.

MLX arrays and streams belong to the thread that made them, so a single
scheduler thread runs all generation; waitress threads never touch MLX.
:meth:`BatchScheduler.submit` hands a tokenized request (a :class:`BatchJob`)
to that thread through a queue and returns at once; the job's own queue
brings its chunks back (:meth:`BatchJob.chunks`, what the back end's
``stream_chat`` returns). The thread drives mlx-lm's
:class:`~mlx_lm.generate.BatchGenerator`: every step decodes one token for
each running request in one forward pass, and a new request's prompt is
processed between steps and joins the batch, so nobody waits for the running
answers to finish. Up to ``max_batch`` requests decode together; more wait
in the generator's queue.

Per request, as in :func:`fishtune.infer.generation.stream_generate`:

* its sampler: greedy at temperature 0, else top-p, min-p, top-k and the
  temperature (mlx-lm's filters, in ``make_sampler``'s order) drawn from the
  request's own random key seeded with its seed, so a seed gives the same
  answer alone or in any batch (and the same as ``stream_generate``);
* its logits processors (the repetition penalty), its ``max_tokens``;
* the end tokens (the generator's stop sequences), then the stop strings:
  mlx-lm's streaming detokenizer and a :class:`StopStringFilter` per job; a
  stop string removes the request from the batch at once;
* cancellation: a job whose ``cancel`` event is set (client gone, stream
  closed) leaves the batch before the next step and ends with
  ``finish_reason="cancelled"``.

A failure inside a step fails the requests of that batch (each gets the
error) and the thread starts a fresh generator; it never dies while the
server runs.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from fishtune.infer.generation import GenerationChunk, SamplingConfig, StopStringFilter
from fishtune.serve.errors import BackendError, BackendUnavailable

logger = logging.getLogger(__name__)

PREFILL_STEP = 512  # prompt tokens per forward pass: long prompts don't stall the running answers for long
_CLOSE = object()


class KeyedSampler:
    """``make_sampler``'s chain for one request, drawing from its own key (``mx.random.seed`` would be global)."""

    def __init__(self, sampling: SamplingConfig):
        import mlx.core as mx

        self.sampling = sampling
        self.key = mx.random.key(sampling.seed)

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        s = self.sampling
        if 0 < s.top_p < 1.0:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p != 0.0:
            logprobs = apply_min_p(logprobs, s.min_p)
        if s.top_k > 0:
            logprobs = apply_top_k(logprobs, s.top_k)
        self.key, sub = mx.random.split(self.key)  # the same key chain as the global seed's
        return mx.random.categorical(logprobs * (1.0 / s.temperature), key=sub)


@dataclass(eq=False)
class BatchJob:
    """One request: its prompt ids, sampling (with a seed unless greedy), stop strings; its chunks come back on ``out``."""

    ids: list[int]
    sampling: SamplingConfig
    stop_strings: tuple[str, ...]
    cancel: threading.Event = field(default_factory=threading.Event)
    out: "queue.SimpleQueue[GenerationChunk | BaseException]" = field(default_factory=queue.SimpleQueue)

    def chunks(self) -> Iterator[GenerationChunk]:
        """The job's chunks up to the final one; closing early cancels it (it leaves the batch)."""
        try:
            while True:
                item = self.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel.set()


class _Running:
    """A job in the generator (scheduler thread only): its detokenizer, stop filter and counts."""

    def __init__(self, job: BatchJob, detokenizer: Any):
        self.job = job
        self.detokenizer = detokenizer
        self.stops = StopStringFilter(job.stop_strings)
        self.tokens = 0
        self.t_start = time.perf_counter()
        self.t_first: float | None = None

    def final(self, text: str, reason: str) -> GenerationChunk:
        now = time.perf_counter()
        first = self.t_first or now
        return GenerationChunk(text, reason, len(self.job.ids), self.tokens,
                               self.tokens / max(now - first, 1e-9), len(self.job.ids) / max(first - self.t_start, 1e-9))

    def step(self, token: int, finish: str | None) -> GenerationChunk | None:
        """The chunk for one generated token (None: nothing to show yet); mlx-lm's ``finish`` is stop or length."""
        self.tokens += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if finish != "stop":  # an end token is not text
            self.detokenizer.add_token(token)
        if finish is not None:
            self.detokenizer.finalize()
        text, stopped = self.stops.feed(self.detokenizer.last_segment, last=finish is not None)
        if stopped or finish is not None:
            return self.final(text, "stop" if stopped else finish)
        return GenerationChunk(text) if text else None


class BatchScheduler:
    """The thread that owns the model; :meth:`submit` jobs from any thread."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.active = 0  # jobs in the generator, read by /api/health (written by the scheduler thread only)
        self._inbox: "queue.SimpleQueue[BatchJob | object]" = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mlx-batch", daemon=True)
        self._thread.start()

    def submit(self, job: BatchJob) -> BatchJob:
        if self._closed:
            raise BackendUnavailable("the server is shutting down; try again in a moment")
        self._inbox.put(job)
        return job

    def stats(self) -> dict[str, int]:
        return {"batch_running": self.active, "batch_max": self.max_batch, "batch_queued": self._inbox.qsize()}

    def close(self, timeout_s: float = 30.0) -> None:
        self._closed = True
        self._inbox.put(_CLOSE)
        self._thread.join(timeout_s)

    # ---- the scheduler thread ---------------------------------------------------------

    def _new_generator(self) -> Any:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(self.model, stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
                              completion_batch_size=self.max_batch, prefill_batch_size=min(8, self.max_batch),
                              prefill_step_size=PREFILL_STEP, stream=mx.default_stream(mx.default_device()))

    def _take(self, block: bool) -> tuple[list[BatchJob], bool]:
        """The jobs waiting in the inbox (waiting for one when ``block``), and whether to close."""
        items = [self._inbox.get()] if block else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return [i for i in items if i is not _CLOSE], any(i is _CLOSE for i in items)

    def _start(self, gen: Any, running: dict[int, _Running], job: BatchJob) -> None:
        from mlx_lm.sample_utils import make_logits_processors

        if job.cancel.is_set():
            job.out.put(GenerationChunk("", "cancelled", len(job.ids), 0))
            return
        s = job.sampling
        sampler = None if s.greedy else KeyedSampler(s)  # None: the generator's greedy sampler, batched
        processors = make_logits_processors(
            repetition_penalty=s.repetition_penalty if s.repetition_penalty != 1.0 else None)
        (uid,) = gen.insert([job.ids], max_tokens=[s.max_tokens], samplers=[sampler], logits_processors=[processors])
        running[uid] = _Running(job, self.tokenizer.detokenizer)

    def _finish(self, gen: Any, running: dict[int, _Running], uid: int, chunk: GenerationChunk,
                in_batch: bool) -> None:
        running.pop(uid).job.out.put(chunk)
        if in_batch:
            gen.remove([uid])

    def _step(self, gen: Any, running: dict[int, _Running]) -> None:
        """Drop the cancelled jobs, then one generation step for all the others."""
        for uid in [u for u, r in running.items() if r.job.cancel.is_set()]:
            self._finish(gen, running, uid, running[uid].final(running[uid].stops.flush(), "cancelled"), True)
        if not running:
            return
        _, responses = gen.next()
        for resp in responses:
            r = running.get(resp.uid)
            chunk = r.step(resp.token, resp.finish_reason) if r is not None else None
            if chunk is None:
                continue
            if chunk.finish_reason is None:
                r.job.out.put(chunk)
            else:  # a stop string ends it before mlx-lm would: take it out of the batch too
                self._finish(gen, running, resp.uid, chunk, resp.finish_reason is None)

    @staticmethod
    def _fail(running: dict[int, _Running], waiting: list[BatchJob], exc: BaseException) -> None:
        """End every job in the generator and every one not started yet with ``exc``."""
        for job in [r.job for r in running.values()] + waiting:
            job.out.put(exc)
        running.clear()
        waiting.clear()

    def _run(self) -> None:
        gen = None
        running: dict[int, _Running] = {}
        closing = False
        while not closing:
            jobs, closing = self._take(block=not running)
            try:
                gen = gen if gen is not None else self._new_generator()
                while jobs:
                    self._start(gen, running, jobs[0])
                    jobs.pop(0)
                self._step(gen, running)
            except Exception as exc:  # noqa: BLE001  (the thread must outlive any failure)
                logger.exception("batched generation failed; failing %d request(s)", len(running) + len(jobs))
                self._fail(running, jobs, BackendError(f"generation failed ({type(exc).__name__}); try again"))
                gen = None
            self.active = len(running)
        self._fail(running, self._take(block=False)[0],
                   BackendUnavailable("the server is shutting down; try again in a moment"))


__all__ = ["BatchScheduler", "BatchJob", "KeyedSampler", "PREFILL_STEP"]
