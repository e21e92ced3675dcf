"""GGUF quantization: llama.cpp's own quantizer for K-quants and Q4_0.

F32 / F16 / BF16 / Q8_0 are written directly by ``fishtune.export.gguf_writer``
(Q8_0 with ``gguf``'s numpy port of llama.cpp's reference quantizer), so
they work without llama.cpp. The K-quants use llama.cpp itself through
llama-cpp-python's ``llama_model_quantize`` on an unquantized intermediate:
the importance-free mixes (e.g. Q4_K_M keeps some tensors in Q6_K) are
llama.cpp's decisions, not ours.
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from fishtune.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_K_M"
# Types that need llama.cpp, mapped to llama.h's llama_ftype names.
LLAMA_CPP_TYPES: dict[str, str] = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
# Types our writer produces directly.
WRITER_TYPES = ("Q8_0", "F16", "BF16", "F32")
QUANT_TYPES: tuple[str, ...] = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "F16", "BF16", "F32")
# Unquantized intermediate types for llama.cpp's quantizer (here, not in gguf_export,
# so convert_to_gguf.py --help needs no numpy).
OUTTYPES = ("f32", "f16", "bf16")
K_QUANT_BLOCK = 256  # QK_K: K-quant super-block size (row length must be a multiple)


def normalize_quant_type(name: str) -> str:
    """``q4_k_m`` -> ``Q4_K_M``; unknown names list the valid ones."""
    q = (name or "").strip().upper()
    if q not in QUANT_TYPES:
        raise UserError(f"unknown quantization type {name!r}; choose one of: {', '.join(QUANT_TYPES)}")
    return q


def needs_llama_cpp(qtype: str) -> bool:
    return qtype in LLAMA_CPP_TYPES


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(
            f"llama-cpp-python is not importable ({exc}); install it (pip install llama-cpp-python==0.3.36) "
            f"or pick a type that needs no llama.cpp: {', '.join(WRITER_TYPES)}"
        ) from None
    return llama_cpp


def quantize_with_llama_cpp(
    src: str | os.PathLike, dst: str | os.PathLike, qtype: str, nthread: int | None = None, verbose: bool = False
) -> None:
    """``llama_model_quantize(src -> dst)``; written to a temp file, then renamed."""
    qtype = normalize_quant_type(qtype)
    if not needs_llama_cpp(qtype):
        raise ValueError(f"{qtype} is written by the GGUF writer, not llama.cpp")
    llama_cpp = _import_llama_cpp()
    # llama.cpp logs every tensor through llama-cpp-python's callback; keep it for --verbose.
    # CRITICAL, not ERROR: llama-cpp-python maps ggml's current WARN level to ERROR, so its
    # per-tensor "falling back to q5_0" warnings would print anyway (we report fallbacks ourselves).
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[qtype])
    params.nthread = nthread or os.cpu_count() or 1
    logger.info("quantizing %s -> %s (%s) with llama.cpp", src, dst, qtype)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise UserError(f"llama.cpp failed to quantize {src} to {qtype} (return code {rc}); re-run with --verbose")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def fallback_tensors(gguf_path: str | os.PathLike, qtype: str) -> list[tuple[str, int, str]]:
    """Matrices whose rows are not a multiple of 256 in a K-quant file: (name, row length, stored type).

    llama.cpp cannot store those as K-quants and falls back (Q4_K -> Q5_0,
    Q5_K -> Q5_1, Q6_K -> Q8_0).
    """
    from fishtune.export.gguf_writer import read_gguf_header

    if not qtype.startswith(("Q4_K", "Q5_K", "Q6_K")):
        return []
    return [
        (t.name, t.shape[0], t.type_name)
        for t in read_gguf_header(gguf_path)[1]
        if len(t.shape) >= 2 and t.shape[0] % K_QUANT_BLOCK != 0
    ]


def describe_types(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def size_mb(path: str | os.PathLike) -> float:
    return Path(path).stat().st_size / 1e6
