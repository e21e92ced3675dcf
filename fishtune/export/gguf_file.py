"""Reading GGUF files back: header, tensor types, one dequantized tensor.

Used by the pipeline's report (tensor types, K-quant fallbacks), the
verifier (every tensor dequantized) and the llama.cpp loader (does the file
hold quantized tensors?). Writing is :mod:`fishtune.export.gguf_writer`.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from fishtune.errors import UserError
from fishtune.export.gguf_types import FLOAT_TENSOR_TYPES, K_QUANT_BLOCK, is_k_quant

# GGUF value types (gguf.GGUFValueType) -> struct format; 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_name: str
    offset: int  # absolute file offset of the data


class _HeaderReader:
    """Walks a GGUF header in a buffer with ``struct`` (no numpy views)."""

    def __init__(self, buf: Any):
        self.buf = buf
        self.pos = 4  # after the magic

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vt: int, decode: bool = False) -> Any:
        if vt == _STRING:
            return self.string()
        if vt == _ARRAY:
            et, n = self.unpack("I"), self.unpack("Q")
            if decode:
                return [self.value(et) for _ in range(n)]
            if et == _STRING:
                for _ in range(n):
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            else:
                self.pos += n * struct.calcsize(_SCALAR_FORMATS[et])
            return ("array", et, n)
        return self.unpack(_SCALAR_FORMATS[vt])


def read_gguf_header(
    path: str | os.PathLike, arrays: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata and tensor infos of a GGUF file, fast.

    ``gguf.GGUFReader`` builds a numpy view per token and merge (~300k for
    Qwen2), which takes seconds; this walks the header once with ``struct``.
    Arrays named in ``arrays`` are decoded to lists; others come back as
    ``("array", element_type, count)``.
    """
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        r = _HeaderReader(mm)
        _version, n_tensors, n_kv = r.unpack("I"), r.unpack("Q"), r.unpack("Q")
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = r.value(r.unpack("I"), key in arrays)
        raw = []
        for _ in range(n_tensors):
            name = r.string()
            shape = tuple(r.unpack("Q") for _ in range(r.unpack("I")))
            raw.append((name, shape, r.unpack("I"), r.unpack("Q")))
        align = int(kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = (r.pos + align - 1) // align * align
    finally:
        mm.close()
    infos = [TensorInfo(n, sh, gguf.GGMLQuantizationType(t).name, start + off) for n, sh, t, off in raw]
    return kv, infos


def tensor_type_counts(gguf_path: str | os.PathLike) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds."""
    counts: dict[str, int] = {}
    for t in read_gguf_header(gguf_path)[1]:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return counts


def has_quantized_tensors(gguf_path: str | os.PathLike) -> bool:
    """True when any tensor is stored in a quantized (non-float) ggml type."""
    return any(name not in FLOAT_TENSOR_TYPES for name in tensor_type_counts(gguf_path))


def fallback_tensors(gguf_path: str | os.PathLike, qtype: str) -> list[tuple[str, int, str]]:
    """Matrices whose rows are not a multiple of 256 in a K-quant file: (name, row length, stored type).

    llama.cpp cannot store those as K-quants and falls back (Q4_K -> Q5_0,
    Q5_K -> Q5_1, Q6_K -> Q8_0).
    """
    if not is_k_quant(qtype):
        return []
    return [
        (t.name, t.shape[0], t.type_name)
        for t in read_gguf_header(gguf_path)[1]
        if len(t.shape) >= 2 and t.shape[0] % K_QUANT_BLOCK != 0
    ]


def read_tensor(data: Any, info: TensorInfo):
    """One tensor dequantized to float32 numpy in HF (row-major) shape; ``data``: the file as a uint8 memmap."""
    import gguf
    import numpy as np

    qt = gguf.GGMLQuantizationType[info.type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n = int(np.prod(info.shape))
    raw = np.array(data[info.offset : info.offset + n // block * type_size])
    return gguf.quants.dequantize(raw.reshape(n // info.shape[0], -1), qt).reshape(tuple(reversed(info.shape)))


__all__ = ["TensorInfo", "read_gguf_header", "tensor_type_counts", "has_quantized_tensors", "fallback_tensors",
           "read_tensor"]
