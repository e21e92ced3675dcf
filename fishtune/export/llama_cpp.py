"""llama.cpp through llama-cpp-python: loading a GGUF, quantizing one, asking its vocabulary.

The one module in fishtune that imports ``llama_cpp``. Everything that runs
llama.cpp goes through here: the GGUF proof (:mod:`fishtune.export.verify`),
the quantization step of ``convert_to_gguf.py``, ``server.py --gguf`` and the
benches.

**The repack workaround** (:func:`open_llama`, ``repack``). llama.cpp's CPU
back end may load weights into "extra buffer types": repacked layouts for
its AVX-512 kernels and, where the build and the CPU have AMX, its AMX
buffer type, which takes only quantized tensors (Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/
Q6_K/IQ4_XS). Measured with llama-cpp-python 0.3.36:

* on this project's Intel Xeon VM that advertises AMX (flags ``amx_bf16``,
  ``amx_tile``; llama.cpp compiled natively there), loading a **Q4_K_M**
  file with the default (repacking on) and evaluating a multi-token batch
  died with **SIGSEGV**, for the bench model and for Qwen2-1.5B
  (``bench/results/generate.json``, ``scale.json``); F16 files ran there;
* on an AMD EPYC VM without AMX (AVX-512, ``REPACK = 1`` in
  ``llama_print_system_info()``, no ``AMX_INT8``), a 10-token batch ran
  with repacking on and off for F32, F16, Q8_0, Q4_0, Q4_K_M and Q6_K
  files, with the same logits (2026-12-02).

So repacking is turned off (``use_extra_bufts = False``, llama-cli's
``--no-repack``) only where it crashed: a CPU that advertises AMX loading a
file with quantized tensors. ``repack=True/False`` or the environment
variable ``FISHTUNE_LLAMA_REPACK=1/0`` (read at each load) overrides the
rule. llama-cpp-python's ``Llama()`` has no argument for it, so the default
model-params factory it calls is wrapped for the duration of that one load
(under a lock) and restored afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator

from fishtune.errors import UserError
from fishtune.export.gguf_types import (
    LLAMA_CPP_TYPES,
    WRITER_TYPES,
    needs_llama_cpp,
    normalize_quant_type,
)
from fishtune.fileio import atomic_path

logger = logging.getLogger(__name__)

REPACK_ENV = "FISHTUNE_LLAMA_REPACK"
_PARAMS_LOCK = threading.Lock()


def import_llama_cpp():
    """The ``llama_cpp`` package, or a UserError saying how to get it and what works without it."""
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(
            f"llama-cpp-python is not importable ({exc}); install it (pip install llama-cpp-python==0.3.36) "
            f"or pick a type that needs no llama.cpp: {', '.join(WRITER_TYPES)}"
        ) from None
    return llama_cpp


# ---- the repack workaround ---------------------------------------------------------


def cpu_has_amx(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises AMX (``amx_*`` flags); False where that can't be read (macOS)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return any(flag.startswith("amx") for flag in line.split(":", 1)[-1].split())
    return False


def _has_quantized_tensors(path: str | os.PathLike) -> bool:
    from fishtune.export.gguf_file import has_quantized_tensors

    try:
        return has_quantized_tensors(path)
    except Exception:  # an unreadable header: assume the case that crashed; llama.cpp reports the file
        return True


def repack_enabled(path: str | os.PathLike, repack: bool | None = None) -> bool:
    """Whether llama.cpp may repack the weights of ``path`` (see the module docstring)."""
    if repack is not None:
        return repack
    env = os.environ.get(REPACK_ENV, "").strip()
    if env:
        if env not in ("0", "1"):
            raise UserError(f"{REPACK_ENV}={env!r}: use 1 (repack weights) or 0 (don't); unset: decide per CPU and file")
        return env == "1"
    return not (cpu_has_amx() and _has_quantized_tensors(path))


@contextlib.contextmanager
def _model_params(**overrides: Any) -> Iterator[None]:
    """Make ``Llama()`` start from llama.cpp's default model params with ``overrides``, for one load."""
    import llama_cpp.llama_cpp as lib

    with _PARAMS_LOCK:
        default = lib.llama_model_default_params

        def params():
            p = default()
            for key, value in overrides.items():
                setattr(p, key, value)
            return p

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = default


# ---- loading -------------------------------------------------------------------------


def open_llama(
    path: str | os.PathLike,
    n_ctx: int = 512,
    logits_all: bool = False,
    f32_kv: bool = False,
    repack: bool | None = None,
    n_threads: int | None = None,
    **kwargs: Any,
):
    """``llama_cpp.Llama`` for a GGUF file: quiet, seed 0, optionally an F32 KV cache.

    ``repack``: let llama.cpp repack the weights (None: ``FISHTUNE_LLAMA_REPACK``,
    else off only for quantized files on AMX CPUs, where it crashed).
    """
    llama_cpp = import_llama_cpp()
    if f32_kv:
        kwargs.setdefault("type_k", llama_cpp.GGML_TYPE_F32)
        kwargs.setdefault("type_v", llama_cpp.GGML_TYPE_F32)
    allow = repack_enabled(path, repack)
    logger.debug("llama.cpp: loading %s (weight repacking %s)", path, "on" if allow else "off")
    ctx = contextlib.nullcontext() if allow else _model_params(use_extra_bufts=False)
    with ctx:
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
            n_threads=n_threads or os.cpu_count() or 1, seed=0, **kwargs,
        )


def tokenize(llm: Any, text: str) -> list[int]:
    """``text``'s ids in llama.cpp: no BOS added, special tokens (``<|endoftext|>``) parsed as such."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def is_end_of_generation(llm: Any, token: int) -> bool:
    """True for the tokens that end generation in llama.cpp (EOS, EOT, ...), by the public vocab API."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


# ---- quantizing ----------------------------------------------------------------------


def quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, nthread: int | None = None) -> None:
    """llama.cpp's ``llama_model_quantize(src -> dst)`` to ``qtype`` (a K-quant or Q4_0); atomic."""
    qtype = normalize_quant_type(qtype)
    if not needs_llama_cpp(qtype):
        raise ValueError(f"{qtype} is written by the GGUF writer, not llama.cpp")
    llama_cpp = import_llama_cpp()
    # llama.cpp logs every tensor through the "llama-cpp-python" logger; convert_to_gguf.py
    # (gguf_cli) decides what of it to show.
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[qtype])
    params.nthread = nthread or os.cpu_count() or 1
    logger.info("quantizing %s -> %s (%s) with llama.cpp", src, dst, qtype)
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise UserError(f"llama.cpp failed to quantize {src} to {qtype} (return code {rc}); re-run with --verbose")


__all__ = ["REPACK_ENV", "import_llama_cpp", "cpu_has_amx", "repack_enabled", "open_llama", "tokenize",
           "is_end_of_generation", "quantize"]
