"""Generation back ends for the web server, behind one small interface.

* :class:`MLXBackend`: base model + adapter through :mod:`fishtune.loading`
  and :mod:`fishtune.infer.generation` (the fine-tuned model as trained).
* :class:`LlamaCppBackend`: a GGUF file through llama.cpp
  (:mod:`fishtune.export.llama_cpp`), prompted with the project template
  that :mod:`fishtune.export.gguf_meta` finds for it (GGUF metadata, the
  Modelfile or ``fishtune.json`` next to it, or the default).
* :class:`OllamaBackend`: a running Ollama, through its ``/api/chat`` over
  plain HTTP (``requests``), streamed NDJSON or one JSON answer; Ollama
  applies the Modelfile's TEMPLATE/SYSTEM itself.

Every back end takes chat messages (``[{"role", "content"}, ...]``, an
optional system message first) and yields
:class:`fishtune.infer.generation.GenerationChunk` s from a generator: text
pieces, the last one with ``finish_reason`` and token counts. ``cancel`` (a
``threading.Event``) or closing the generator stops generation early.
``serialize`` says whether requests must take turns (the model's state is
not thread-safe); :class:`fishtune.serve.streaming.Generation` keeps that gate.
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
    stream_generate,
)
from fishtune.template import PromptTemplate, check_messages, get_template

logger = logging.getLogger(__name__)

Messages = Sequence[dict]


class BackendError(Exception):
    """The back end failed to answer (HTTP 502); the message is shown to the user."""

    status = 502


class BackendUnavailable(BackendError):
    """The back end can't be reached at all (HTTP 503), e.g. Ollama isn't running."""

    status = 503


class Backend:
    """The interface the web app uses. Subclasses set the attributes and ``stream_chat``."""

    kind = "base"
    template: PromptTemplate
    system_prompt: str | None = None
    tokenizer: Any = None  # has .encode(text) -> ids, for the chat history's token budget; None: count chars
    context_tokens: int = 2048  # prompt budget for the history
    serialize = True  # generation must run one request at a time (model state isn't thread-safe)

    @property
    def model_name(self) -> str:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What ``/api/health`` shows about the back end."""
        return {"backend": self.kind, "model": self.model_name, "adapter": None, "template": self.template.name}

    def check(self) -> str | None:
        """None when the back end can answer, else a one-line reason (health endpoint)."""
        return None

    def render(self, messages: Messages) -> str:
        """The template prompt for ``messages`` (the default system prompt when none is given)."""
        return self.template.render_prompt(messages, self.system_prompt)

    def stream_chat(self, messages: Messages, sampling: SamplingConfig,
                    cancel: threading.Event | None = None) -> Generator[GenerationChunk, None, None]:
        raise NotImplementedError

    def chat(self, messages: Messages, sampling: SamplingConfig,
             cancel: threading.Event | None = None) -> GenerationResult:
        """The whole answer at once (the stream collected)."""
        return collect(self.stream_chat(messages, sampling, cancel))

    def close(self) -> None:
        """Free the model at shutdown (nothing to free by default)."""


# ---- MLX -------------------------------------------------------------------------


class MLXBackend(Backend):
    """The fine-tuned model in MLX (``fishtune.loading.LoadedModel``)."""

    kind = "mlx"

    def __init__(self, lm: Any, context_tokens: int = 2048, system_prompt: str | None = None):
        """``lm``: from :func:`fishtune.loading.load_model` (which materialised the fused weights on its thread)."""
        self.lm = lm
        self.template = lm.template
        self.system_prompt = system_prompt if system_prompt is not None else lm.system_prompt
        self.tokenizer = lm.tokenizer
        self.context_tokens = context_tokens
        logger.info("loaded %s", lm.describe())

    @property
    def model_name(self) -> str:
        return Path(self.lm.model_path).name or self.lm.model_path

    def info(self) -> dict[str, Any]:
        return {**super().info(), "model": self.lm.model_path, "adapter": self.lm.adapter_path, "fused": self.lm.fused}

    def stream_chat(self, messages, sampling, cancel=None):
        if sampling.seed is None:
            # MLX's random state is per thread and starts the same in each new thread:
            # without a fresh seed, every worker thread would sample the same answers.
            sampling = dataclasses.replace(sampling, seed=random.randrange(2**32))
        return stream_generate(self.lm, self.render(messages), sampling, cancel=cancel)


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
        self.n_ctx = n_ctx
        self.tokenizer = _LlamaTokenizer(self.llm)
        self.context_tokens = max(64, n_ctx // 2)

    @property
    def model_name(self) -> str:
        return self.path.name

    def info(self) -> dict[str, Any]:
        return {**super().info(), "model": str(self.path), "n_ctx": self.n_ctx}

    def stream_chat(self, messages, sampling, cancel=None):
        ids = llama.tokenize(self.llm, self.render(messages))
        room = self.n_ctx - len(ids)
        if room < 1:
            raise UserError(f"the prompt is {len(ids)} tokens, more than the context of {self.n_ctx}; "
                            "send a shorter message or start a new conversation")
        return self._stream(ids, sampling, min(sampling.max_tokens, room), cancel)

    def _stream(self, ids, sampling, max_tokens, cancel):
        self.llm.set_seed(sampling.seed if sampling.seed is not None else random.randrange(2**31))
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        stops = StopStringFilter(self.template.stop_strings)
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
                        out += stops.feed(dec.decode(b"", final=True))[0] + stops.flush()
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

    def stream_chat(self, messages, sampling, cancel=None):
        payload = self._payload(messages, sampling, True)
        r = self._post(payload, True)  # connection errors surface here, before the first chunk
        return self._iter_ndjson(r, cancel)

    def _iter_ndjson(self, r, cancel):
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
                text = (d.get("message") or {}).get("content", "")
                if d.get("done"):
                    n = int(d.get("eval_count", 0) or 0)
                    yield GenerationChunk(text, self._finish(d), int(d.get("prompt_eval_count", 0) or 0), n,
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

    def chat(self, messages, sampling, cancel=None):
        """One non-streamed ``/api/chat`` call."""
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
        n = int(d.get("eval_count", 0) or 0)
        return GenerationResult(d["message"]["content"], self._finish(d), int(d.get("prompt_eval_count", 0) or 0),
                                n, 0.0, 0.0, time.perf_counter() - t0)


__all__ = ["Backend", "BackendError", "BackendUnavailable", "MLXBackend", "LlamaCppBackend", "OllamaBackend",
           "OLLAMA_DEFAULT_URL", "Messages"]
