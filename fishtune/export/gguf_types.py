"""GGUF output types: which exist, which our writer makes, which need llama.cpp.

Names only (no numpy, no ``gguf``), so ``convert_to_gguf.py --help`` stays
cheap. F32 / F16 / BF16 / Q8_0 are written directly by
:mod:`fishtune.export.gguf_writer` (Q8_0 with ``gguf``'s numpy port of
llama.cpp's reference quantizer), so they work without llama.cpp. The
K-quants and Q4_0 are made by llama.cpp itself
(:func:`fishtune.export.llama_cpp.quantize`) from an unquantized
intermediate: the mixes (e.g. Q4_K_M keeps some tensors in Q6_K) are
llama.cpp's decisions, not ours.
"""
from __future__ import annotations

from fishtune.errors import UserError

DEFAULT_QUANT = "Q4_K_M"
QUANT_TYPES: tuple[str, ...] = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "F16", "BF16", "F32")
# Types our writer produces directly.
WRITER_TYPES: tuple[str, ...] = ("Q8_0", "F16", "BF16", "F32")
# Types that need llama.cpp, mapped to llama.h's llama_ftype names.
LLAMA_CPP_TYPES: dict[str, str] = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
# Unquantized intermediate types for llama.cpp's quantizer (--outtype).
OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16")
# ggml tensor types that are plain floats (everything else is quantized).
FLOAT_TENSOR_TYPES = frozenset({"F32", "F16", "BF16"})
K_QUANT_BLOCK = 256  # QK_K: K-quant super-block size (row length must be a multiple)
K_QUANT_PREFIXES = ("Q4_K", "Q5_K", "Q6_K")


def normalize_quant_type(name: str) -> str:
    """``q4_k_m`` -> ``Q4_K_M``; unknown names list the valid ones."""
    q = (name or "").strip().upper()
    if q not in QUANT_TYPES:
        raise UserError(f"unknown quantization type {name!r}; choose one of: {', '.join(QUANT_TYPES)}")
    return q


def needs_llama_cpp(qtype: str) -> bool:
    """True for the types only llama.cpp's quantizer makes."""
    return qtype in LLAMA_CPP_TYPES


def is_k_quant(qtype: str) -> bool:
    return qtype.startswith(K_QUANT_PREFIXES)
