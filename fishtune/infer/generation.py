"""Streaming generation with the template's stop strings and sampling settings.

Built on ``mlx_lm.generate.stream_generate`` (``make_sampler`` and
``make_logits_processors`` for the sampling settings). On top of it:

* stop strings: text that could be the start of a stop string (a lone ``#``
  or ``##`` with the alpaca template) is held back until it is clear it is
  not one, so a stream never shows half a stop string, and the answer is cut
  at the stop. Trailing whitespace before a stop is dropped too.
* ``finish_reason`` is ``"stop"`` (end token or stop string), ``"length"``
  (``max_tokens`` reached) or ``"cancelled"`` (``cancel`` event set).
* stopping early: break out of the iterator, or set a ``threading.Event``
  passed as ``cancel`` (Ctrl-C in the chat, client disconnects in the server).
"""
from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from fishtune.errors import UserError
from fishtune.template import find_stop

if TYPE_CHECKING:
    from fishtune.loading import LoadedModel

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class SamplingConfig:
    """Sampling settings; the defaults are the seed's (temperature 0.7, top-p 0.9, 512 tokens).

    ``temperature=0`` is greedy decoding. ``top_k=0``, ``min_p=0`` and
    ``repetition_penalty=1`` switch those filters off.
    """

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        def num(name: str, lo: float, hi: float, lo_open: bool = False) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"{name} must be a number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or v > hi:
                rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
                raise UserError(f"{name}={v!r} is out of range; use a value in {rng}")
            return float(v)

        def integer(name: str, lo: int, hi: int) -> int:
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"{name} must be an integer, got {v!r}")
            if not lo <= v <= hi:
                raise UserError(f"{name}={v!r} is out of range; use an integer in [{lo}, {hi}]")
            return v

        self.temperature = num("temperature", 0.0, 5.0)
        self.top_p = num("top_p", 0.0, 1.0, lo_open=True)
        self.top_k = integer("top_k", 0, 1_000_000)
        self.min_p = num("min_p", 0.0, 1.0)
        self.repetition_penalty = num("repetition_penalty", 0.0, 10.0, lo_open=True)
        self.max_tokens = integer("max_tokens", 1, 1_000_000)
        if self.seed is not None:
            self.seed = integer("seed", 0, 2**32 - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationChunk:
    """A piece of streamed text. The last chunk has ``finish_reason`` set and the counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    prompt_tps: float = 0.0


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    generation_tps: float
    prompt_tps: float
    elapsed_s: float

    def to_dict(self) -> dict:
        return asdict(self)


class StopStringFilter:
    """Incremental stop-string cutting for streamed text.

    ``feed(piece)`` returns ``(text safe to emit, stopped)``; with
    ``last=True`` (the stream ends with this piece) nothing is held back;
    ``flush()`` returns what is still held back when the stream ends otherwise.
    Held back: the longest tail that is a proper prefix of a stop string,
    plus the whitespace before it (dropped if a stop follows).
    """

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = tuple(s for s in stop_strings if s)
        self._buf = ""
        self.stopped = False

    def _held_len(self, buf: str) -> int:
        k = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    k = max(k, n)
                    break
        rest = buf[: len(buf) - k]
        return k + (len(rest) - len(rest.rstrip()))

    def feed(self, piece: str, last: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._buf += piece
        cut = find_stop(self._buf, self.stops)
        if cut >= 0:
            out = self._buf[:cut].rstrip()
            self._buf = ""
            self.stopped = True
            return out, True
        if last:
            return self.flush(), False
        k = self._held_len(self._buf)
        out, self._buf = self._buf[: len(self._buf) - k], self._buf[len(self._buf) - k:]
        return out, False

    def flush(self) -> str:
        """The held-back tail, trailing whitespace dropped (the stream ended without a stop string)."""
        out, self._buf = self._buf, ""
        return out.rstrip()


def ensure_utf8(text: str, what: str = "the text") -> str:
    """``text`` unchanged, or a UserError when it holds undecodable bytes.

    Python smuggles bytes that are not UTF-8 (in argv, or stdin under a C
    locale) into strings as lone surrogates; the tokenizer would crash on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        byte = f" (byte 0x{bad - 0xDC00:02x})" if 0xDC80 <= bad <= 0xDCFF else ""
        raise UserError(f"{what} is not valid UTF-8 text{byte} at character {exc.start}; send UTF-8 text") from None
    return text


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, encoded the way training encoded its texts."""
    return list(tokenizer.encode(ensure_utf8(prompt, "the prompt")))


def stream_generate(
    lm: "LoadedModel",
    prompt: str | Sequence[int],
    sampling: SamplingConfig | None = None,
    *,
    cancel: threading.Event | None = None,
) -> Iterator[GenerationChunk]:
    """Generate from ``prompt`` (text or token ids), yielding text as it comes.

    The last chunk carries ``finish_reason`` and the token counts. The model
    is used as is: build ``prompt`` with ``lm.template`` (``question_prompt``)
    for the fine-tuned format.
    """
    import mlx.core as mx
    from mlx_lm.generate import stream_generate as mlx_stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    sampling = sampling or SamplingConfig()
    ids = encode_prompt(lm.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise UserError("the prompt is empty; give a question or a prompt text")
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p,
                           top_k=sampling.top_k)
    processors = make_logits_processors(
        repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None
    )
    stops = StopStringFilter(lm.template.stop_strings)
    last = None
    finish: str | None = None
    gen = mlx_stream_generate(lm.model, lm.tokenizer, mx.array(ids), max_tokens=sampling.max_tokens,
                              sampler=sampler, logits_processors=processors)
    try:
        for resp in gen:
            last = resp
            cancelled = resp.finish_reason is None and cancel is not None and cancel.is_set()
            out, stopped = stops.feed(resp.text, last=resp.finish_reason is not None or cancelled)
            finish = "stop" if stopped else resp.finish_reason or ("cancelled" if cancelled else None)
            if finish is not None:
                yield GenerationChunk(
                    out, finish, resp.prompt_tokens, resp.generation_tokens, resp.generation_tps, resp.prompt_tps
                )
                return
            if out:
                yield GenerationChunk(out)
    finally:
        gen.close()
    # The mlx generator always ends with a finish_reason; this is a safety net.
    yield GenerationChunk(stops.flush(), "length", len(ids), getattr(last, "generation_tokens", 0),
                          getattr(last, "generation_tps", 0.0), getattr(last, "prompt_tps", 0.0))


def generate(
    lm: "LoadedModel",
    prompt: str | Sequence[int],
    sampling: SamplingConfig | None = None,
    *,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """The whole answer at once (``stream_generate`` collected)."""
    return collect(stream_generate(lm, prompt, sampling, cancel=cancel))


def collect(chunks: Iterable[GenerationChunk]) -> GenerationResult:
    """A stream of chunks (any back end's) as one result; the last chunk has the counts."""
    t0 = time.perf_counter()
    parts: list[str] = []
    final = GenerationChunk("", "length")
    for chunk in chunks:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            final = chunk
    return GenerationResult(
        text="".join(parts),
        finish_reason=final.finish_reason or "length",
        prompt_tokens=final.prompt_tokens,
        generation_tokens=final.generation_tokens,
        generation_tps=final.generation_tps,
        prompt_tps=final.prompt_tps,
        elapsed_s=time.perf_counter() - t0,
    )


def add_sampling_args(p: argparse.ArgumentParser, *, greedy_note: str = "") -> None:
    """The sampling flags shared by inference.py and inference-chat.py (defaults: None = SamplingConfig's)."""
    d = SamplingConfig()
    g = p.add_argument_group("sampling" + (f" ({greedy_note})" if greedy_note else ""))
    g.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default: {d.temperature})")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling, 1 = off (default: {d.top_p})")
    g.add_argument("--top-k", type=int, default=None, help=f"0 = off (default: {d.top_k})")
    g.add_argument("--min-p", type=float, default=None, help=f"0 = off (default: {d.min_p})")
    g.add_argument("--repetition-penalty", type=float, default=None, help=f"1 = off (default: {d.repetition_penalty})")
    g.add_argument("--max-tokens", type=int, default=None, help=f"answer length limit in tokens (default: {d.max_tokens})")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def sampling_from_args(args: argparse.Namespace, **defaults: Any) -> SamplingConfig:
    """A SamplingConfig from the flags; ``defaults`` replace SamplingConfig's for flags not given."""
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")
    values = dict(defaults)
    values.update({k: getattr(args, k) for k in keys if getattr(args, k, None) is not None})
    return SamplingConfig(**values)


__all__ = ["add_sampling_args", "sampling_from_args", "SamplingConfig", "GenerationChunk", "GenerationResult", "StopStringFilter", "stream_generate",
           "generate", "collect", "encode_prompt", "ensure_utf8", "FINISH_REASONS"]
