"""Generation back ends for the web server, behind one small interface.

* :class:`MLXBackend`: base model + adapter through :mod:`fishtune.loading`
  (the fine-tuned model as trained), concurrent requests decoded together
  by one scheduler thread (:mod:`fishtune.serve.batching`).
* :class:`LlamaCppBackend`: a GGUF file through llama.cpp
  (:mod:`fishtune.export.llama_cpp`), prompted with the project template
  that :mod:`fishtune.export.gguf_meta` finds for it (GGUF metadata, the
  Modelfile or ``fishtune.json`` next to it, or the default); one request
  at a time (``serialize``).
* :class:`OllamaBackend`: a running Ollama, through its ``/api/chat`` over
  plain HTTP (``requests``), streamed NDJSON or one JSON answer; Ollama
  applies the Modelfile's TEMPLATE/SYSTEM itself and queues requests.

Every back end takes chat messages (``[{"role", "content"}, ...]``, an
optional system message first) and yields
:class:`fishtune.infer.generation.GenerationChunk` s from a generator: text
pieces, the last one with ``finish_reason`` and token counts. ``cancel`` (a
``threading.Event``) or closing the generator stops generation early;
``stop`` adds stop strings to the template's. ``serialize`` says whether
requests must take turns (the model's state is not thread-safe);
:class:`fishtune.serve.streaming.Generation` keeps that gate. The prompt
budget (:meth:`Backend.fit_prompt`) is checked before generation starts, so
an over-long prompt is a 400 on every endpoint.
"""
from __future__ import annotations

import codecs
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Generator, Sequence

from fishtune.errors import UserError
from fishtune.export import llama_cpp as llama
from fishtune.export.gguf_meta import gguf_project_meta
from fishtune.infer.generation import (
    GenerationChunk,
    GenerationResult,
    SamplingConfig,
    StopStringFilter,
    collect,
    encode_prompt,
    ensure_utf8,
)
from fishtune.serve.batching import BatchJob, BatchScheduler
from fishtune.serve.errors import BackendError, BackendUnavailable
from fishtune.template import PromptTemplate, check_messages, get_template

logger = logging.getLogger(__name__)

Messages = Sequence[dict]


class Backend:
    """The interface the web app uses. Subclasses set the attributes and ``stream_chat``."""

    kind = "base"
    template: PromptTemplate
    system_prompt: str | None = None
    tokenizer: Any = None  # has .encode(text) -> ids, for the chat history's token budget; None: count chars
    context_tokens: int = 2048  # prompt budget (the history is cut to it; a longer prompt is refused)
    model_context: int | None = None  # the model's context in tokens (prompt + answer), None: unknown
    vocab_size: int | None = None  # top_k must stay below it; None: unknown
    serialize = True  # generation must run one request at a time (model state isn't thread-safe)

    @property
    def model_name(self) -> str:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What ``/api/health`` shows about the back end (file and folder names, never absolute paths)."""
        return {"backend": self.kind, "model": self.model_name, "adapter": None, "template": self.template.name}

    def check(self) -> str | None:
        """None when the back end can answer, else a one-line reason (health endpoint)."""
        return None

    def stats(self) -> dict[str, int]:
        """Queue counters for ``/api/health`` (none by default)."""
        return {}

    def render(self, messages: Messages) -> str:
        """The template prompt for ``messages`` (the default system prompt when none is given)."""
        return self.template.render_prompt(messages, self.system_prompt)

    def fit_prompt(self, prompt_tokens: int, max_tokens: int) -> int:
        """``max_tokens`` cut to the room the model's context leaves; UserError (400) for a prompt that can't fit."""
        if self.model_context is not None and prompt_tokens >= self.model_context:
            raise UserError(f"the prompt is {prompt_tokens} tokens, more than the context of {self.model_context}; "
                            "send a shorter message or start a new conversation")
        if prompt_tokens > self.context_tokens:
            raise UserError(f"the prompt is {prompt_tokens} tokens, over this server's prompt budget of "
                            f"{self.context_tokens} tokens (--max-context-tokens); send fewer or shorter messages")
        return max_tokens if self.model_context is None else min(max_tokens, self.model_context - prompt_tokens)

    def stream_chat(self, messages: Messages, sampling: SamplingConfig, cancel: threading.Event | None = None,
                    stop: Sequence[str] = ()) -> Generator[GenerationChunk, None, None]:
        raise NotImplementedError

    def chat(self, messages: Messages, sampling: SamplingConfig, cancel: threading.Event | None = None,
             stop: Sequence[str] = ()) -> GenerationResult:
        """The whole answer at once (the stream collected)."""
        with contextlib.closing(self.stream_chat(messages, sampling, cancel, stop)) as chunks:
            return collect(chunks)

    def close(self) -> None:
        """Free the model at shutdown (nothing to free by default)."""


# ---- MLX -------------------------------------------------------------------------


class MLXBackend(Backend):
    """The fine-tuned model in MLX (``fishtune.loading.LoadedModel``), batched across requests.

    ``stream_chat`` tokenizes and checks the prompt in the caller's thread,
    then hands it to the :class:`~fishtune.serve.batching.BatchScheduler`,
    whose one thread decodes up to ``max_batch`` requests together.
    """

    kind = "mlx"
    serialize = False  # the scheduler batches concurrent requests

    def __init__(self, lm: Any, context_tokens: int = 2048, system_prompt: str | None = None, max_batch: int = 16):
        """``lm``: from :func:`fishtune.loading.load_model` (which materialised the fused weights)."""
        self.lm = lm
        self.template = lm.template
        self.system_prompt = system_prompt if system_prompt is not None else lm.system_prompt
        self.tokenizer = lm.tokenizer
        self.context_tokens = context_tokens
        args = getattr(lm.model, "args", None)
        self.model_context = getattr(args, "max_position_embeddings", None)
        self.vocab_size = getattr(args, "vocab_size", None)
        self.scheduler = BatchScheduler(lm.model, lm.tokenizer, max_batch=max_batch)
        logger.info("loaded %s; up to %d requests decode together", lm.describe(), max_batch)

    @property
    def model_name(self) -> str:
        return Path(self.lm.model_path).name or self.lm.model_path

    def info(self) -> dict[str, Any]:
        adapter = Path(self.lm.adapter_path).name if self.lm.adapter_path else None
        return {**super().info(), "adapter": adapter, "fused": self.lm.fused, "max_batch": self.scheduler.max_batch}

    def stats(self) -> dict[str, int]:
        return self.scheduler.stats()

    def stream_chat(self, messages, sampling, cancel=None, stop=()):
        ids = encode_prompt(self.tokenizer, self.render(messages))
        max_tokens = self.fit_prompt(len(ids), sampling.max_tokens)
        # A seed for every sampled request: each draws from its own random key, alone or in a batch.
        seed = sampling.seed if sampling.seed is not None or sampling.greedy else random.randrange(2**32)
        job = BatchJob(ids, dataclasses.replace(sampling, max_tokens=max_tokens, seed=seed),
                       self.template.stop_strings + tuple(stop), cancel or threading.Event())
        return self.scheduler.submit(job).chunks()

    def close(self) -> None:
        self.scheduler.close()


# ---- llama.cpp -------------------------------------------------------------------


class _LlamaTokenizer:
    """``encode`` for the chat history's token budget, with llama.cpp's tokenizer."""

    def __init__(self, llm: Any):
        self.llm = llm

    def encode(self, text: str) -> list[int]:
        return llama.tokenize(self.llm, text)


class LlamaCppBackend(Backend):
    """A GGUF file in llama.cpp (for users without Ollama)."""

    kind = "llama.cpp"

    def __init__(self, gguf_path: str, *, n_ctx: int = 2048, n_threads: int | None = None,
                 template: str | None = None, system_prompt: str | None = None):
        path = Path(gguf_path)
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist; write one with convert_to_gguf.py or fix --gguf")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file (no GGUF magic); pass a file written by convert_to_gguf.py")
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError("--gguf needs llama-cpp-python (pip install llama-cpp-python)")
        self.path = path
        try:
            # open_llama turns weight repacking off where it crashes (see fishtune.export.llama_cpp).
            self.llm = llama.open_llama(path, n_ctx=n_ctx, n_threads=n_threads or min(4, os.cpu_count() or 1))
        except ValueError as exc:
            raise UserError(f"llama.cpp can't load {path} ({exc}); is the file complete?") from None
        tpl, system, source = gguf_project_meta(path, dict(self.llm.metadata))
        if template is not None:
            tpl, source = get_template(template), source + "; template from --template"
        self.template = tpl
        self.system_prompt = system_prompt if system_prompt is not None else system
        logger.info("llama.cpp: %s (%s)", path, source)
        self.n_ctx = self.model_context = n_ctx
        self.vocab_size = self.llm.n_vocab()
        self.tokenizer = _LlamaTokenizer(self.llm)
        self.context_tokens = max(64, n_ctx // 2)

    @property
    def model_name(self) -> str:
        return self.path.name

    def info(self) -> dict[str, Any]:
        return {**super().info(), "n_ctx": self.n_ctx}

    def stream_chat(self, messages, sampling, cancel=None, stop=()):
        ids = llama.tokenize(self.llm, ensure_utf8(self.render(messages), "the prompt"))
        max_tokens = self.fit_prompt(len(ids), sampling.max_tokens)
        return self._stream(ids, sampling, max_tokens, cancel, self.template.stop_strings + tuple(stop))

    def _stream(self, ids, sampling, max_tokens, cancel, stop_strings):
        self.llm.set_seed(sampling.seed if sampling.seed is not None else random.randrange(2**31))
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        stops = StopStringFilter(stop_strings)
        t0 = time.perf_counter()
        n = 0
        finish: str | None = None
        gen = self.llm.generate(ids, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                                temp=sampling.temperature, repeat_penalty=sampling.repetition_penalty, reset=True)
        try:
            for tok in gen:
                out = ""
                if llama.is_end_of_generation(self.llm, tok):
                    finish = "stop"
                    out = dec.decode(b"", final=True) + stops.flush()
                else:
                    n += 1
                    out, stopped = stops.feed(dec.decode(self.llm.detokenize([tok])))
                    if stopped:
                        finish = "stop"
                    elif n >= max_tokens:
                        finish = "length"
                        out += stops.feed(dec.decode(b"", final=True), last=True)[0]
                    elif cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        out += stops.flush()
                if finish is not None:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    yield GenerationChunk(out, finish, len(ids), n, n / dt, 0.0)
                    return
                if out:
                    yield GenerationChunk(out)
        finally:
            gen.close()
        yield GenerationChunk(stops.flush(), "length", len(ids), n)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort at shutdown
            self.llm.close()


# ---- Ollama ----------------------------------------------------------------------

OLLAMA_DEFAULT_URL = "http://localhost:11434"


class OllamaBackend(Backend):
    """A model served by a running Ollama (``ollama create fish-care-assistant -f Modelfile``).

    Ollama renders the prompt with the Modelfile's TEMPLATE and SYSTEM; we
    send the messages (a system message only when one is set here, which then
    replaces the Modelfile's SYSTEM). Ollama queues requests itself, so
    generation is not serialized here.
    """

    kind = "ollama"
    serialize = False

    def __init__(self, model: str, url: str = OLLAMA_DEFAULT_URL, *, system_prompt: str | None = None,
                 timeout_s: float = 300.0, context_chars: int = 6000):
        if not model or not isinstance(model, str):
            raise UserError("--ollama needs a model name, e.g. --ollama fish-care-assistant")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--ollama-url {url!r} must start with http:// or https://, e.g. {OLLAMA_DEFAULT_URL}")
        self.model = model
        self.url = url.rstrip("/")
        self.template = get_template()  # only for the history budget: Ollama renders the prompt
        self.system_prompt = system_prompt
        self.timeout_s = timeout_s
        self.context_tokens = context_chars  # no tokenizer here: the history budget counts characters

    @property
    def model_name(self) -> str:
        return self.model

    def info(self) -> dict[str, Any]:
        return {**super().info(), "template": "ollama Modelfile", "ollama_url": self.url}

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(
            f"can't reach Ollama at {self.url} ({type(exc).__name__}); is Ollama running? "
            f"start it with `ollama serve` (and `ollama create {self.model} -f Modelfile` once)"
        )

    def check(self) -> str | None:
        import requests

        try:
            r = requests.get(f"{self.url}/api/tags", timeout=2)
            r.raise_for_status()
            names = {m.get("name", "") for m in r.json().get("models", [])}
        except (requests.RequestException, ValueError) as exc:
            return str(self._unavailable(exc))
        if names and self.model not in names and f"{self.model}:latest" not in names:
            return f"Ollama at {self.url} has no model {self.model!r}; run `ollama create {self.model} -f Modelfile`"
        return None

    def _payload(self, messages: Messages, sampling: SamplingConfig, stream: bool) -> dict[str, Any]:
        check_messages(messages, end="user")  # same message rules as the other back ends
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        options: dict[str, Any] = {
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "min_p": sampling.min_p, "repeat_penalty": sampling.repetition_penalty, "num_predict": sampling.max_tokens,
        }
        if sampling.seed is not None:
            options["seed"] = sampling.seed
        return {"model": self.model, "messages": msgs, "stream": stream, "options": options}

    def _post(self, payload: dict[str, Any], stream: bool):
        import requests

        try:
            r = requests.post(f"{self.url}/api/chat", json=payload, stream=stream, timeout=(5, self.timeout_s))
        except requests.ConnectionError as exc:
            raise self._unavailable(exc) from None
        except requests.RequestException as exc:
            raise BackendError(f"Ollama at {self.url} failed: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            try:
                msg = r.json().get("error") or r.text
            except ValueError:
                msg = r.text
            r.close()
            hint = f"; run `ollama create {self.model} -f Modelfile`" if r.status_code == 404 else ""
            raise BackendError(f"Ollama at {self.url} answered HTTP {r.status_code}: {str(msg)[:300]}{hint}")
        return r

    @staticmethod
    def _finish(d: dict[str, Any]) -> str:
        reason = d.get("done_reason") or "stop"
        return reason if reason in ("stop", "length") else "stop"

    def stream_chat(self, messages, sampling, cancel=None, stop=()):
        payload = self._payload(messages, sampling, True)
        r = self._post(payload, True)  # connection errors surface here, before the first chunk
        return self._iter_ndjson(r, cancel, StopStringFilter(stop) if stop else None)

    def _iter_ndjson(self, r, cancel, stops):
        """Ollama's NDJSON as chunks; ``stops`` (the request's stop strings) ends it here, closing the stream."""
        import requests

        t0 = time.perf_counter()
        try:
            for line in r.iter_lines():
                if not line:
                    continue
                try:
                    d = json.loads(line)
                except ValueError:
                    raise BackendError(f"Ollama at {self.url} sent a line that is not JSON: {line[:100]!r}") from None
                if d.get("error"):
                    raise BackendError(f"Ollama at {self.url}: {d['error']}")
                piece = (d.get("message") or {}).get("content", "")
                text, stopped = stops.feed(piece, last=bool(d.get("done"))) if stops else (piece, False)
                if stopped or d.get("done"):
                    n = int(d.get("eval_count", 0) or 0)
                    yield GenerationChunk(text, "stop" if stopped else self._finish(d),
                                          int(d.get("prompt_eval_count", 0) or 0), n,
                                          n / max(time.perf_counter() - t0, 1e-9))
                    return
                if cancel is not None and cancel.is_set():
                    yield GenerationChunk(text, "cancelled")
                    return
                if text:
                    yield GenerationChunk(text)
        except requests.RequestException as exc:
            raise BackendError(f"Ollama at {self.url} broke off the answer: {type(exc).__name__}") from None
        finally:
            r.close()  # stops Ollama's generation for this request
        raise BackendError(f"Ollama at {self.url} ended the stream without a final done message")

    def chat(self, messages, sampling, cancel=None, stop=()):
        """One non-streamed ``/api/chat`` call; ``stop`` cuts the answer here."""
        t0 = time.perf_counter()
        r = self._post(self._payload(messages, sampling, False), False)
        try:
            d = r.json()
        except ValueError:
            raise BackendError(f"Ollama at {self.url} answered with something that is not JSON: {r.text[:100]!r}") from None
        finally:
            r.close()
        if not isinstance(d, dict) or not isinstance((d.get("message") or {}).get("content"), str):
            raise BackendError(f"Ollama at {self.url} answered without message.content: {str(d)[:200]}")
        text = d["message"]["content"]
        text, stopped = StopStringFilter(stop).feed(text, last=True) if stop else (text, False)
        finish = "stop" if stopped else self._finish(d)
        n = int(d.get("eval_count", 0) or 0)
        return GenerationResult(text, finish, int(d.get("prompt_eval_count", 0) or 0), n, 0.0, 0.0,
                                time.perf_counter() - t0)


__all__ = ["Backend", "BackendError", "BackendUnavailable", "MLXBackend", "LlamaCppBackend", "OllamaBackend",
           "OLLAMA_DEFAULT_URL", "Messages"]
