"""DoRA's weight norm without materialising the adapted weight (training only).

MLX-LM's ``DoRALinear`` computes, in every call, ``adapted = W + s·BᵀAᵀ``
(a full ``[out, in]`` matrix) and its row norms: element-wise work over
every weight of every adapted linear, on one CPU thread, three times a step
with gradient checkpointing (forward, recompute, backward). For Qwen2-1.5B
that is ~1.3 G elements per forward pass. The row norm has a closed form in
terms of small matrices (``A``: ``[in, r]``, ``B``: ``[r, out]``)::

    ||W_o + s·Δ_o||² = ||W_o||² + 2s·Σ_k (W A)[o,k]·B[k,o] + s²·Σ_kl B[k,o]·(AᵀA)[k,l]·B[l,o]

``||W_o||²`` is constant (the base is frozen) and computed once; ``W A`` is a
BLAS matmul (every core). The result equals MLX-LM's norm to float32
rounding and, as there, carries no gradient (``stop_gradient``: DoRA's
norm is treated as a constant, paper section 4.3). The layers stay
``DoRALinear`` instances (same parameters, same saved adapter, same
``fuse``); only ``__call__`` differs.
"""
from __future__ import annotations

from typing import Any


class _Constant:
    """Holds an array outside the module's parameter tree (not trained, not saved)."""

    def __init__(self, value: Any):
        self.value = value


def _fast_class():
    from mlx_lm.tuner.dora import DoRALinear

    class FastDoRALinear(DoRALinear):
        def __call__(self, x):
            import mlx.core as mx

            w = self._dequantized_weight()
            y = x @ w.T
            z = (self.dropout(x) @ self.lora_a) @ self.lora_b
            out = y + (self.scale * z).astype(x.dtype)
            a, b, s = self.lora_a, self.lora_b, self.scale
            cross = ((w @ a) * b.T).sum(axis=1)
            delta_sq = ((b.T @ (a.T @ a)) * b.T).sum(axis=1)
            denom = mx.stop_gradient(mx.sqrt(self._row_sq.value + 2 * s * cross + s * s * delta_sq))
            out = (self.m / denom).astype(x.dtype) * out
            if "bias" in self.linear:
                out = out + self.linear.bias
            return out

    return FastDoRALinear


_CLASS: list[Any] = []


def use_fast_dora_norm(model: Any) -> int:
    """Switch every ``DoRALinear`` of ``model`` to the closed-form norm; returns how many."""
    import mlx.core as mx
    from mlx_lm.tuner.dora import DoRALinear

    if not _CLASS:
        _CLASS.append(_fast_class())
    fast = _CLASS[0]
    n = 0
    for _, module in model.named_modules():
        if type(module) is DoRALinear:
            w = module._dequantized_weight().astype(mx.float32)
            module._row_sq = _Constant(mx.sum(w * w, axis=1))
            mx.eval(module._row_sq.value)
            module.__class__ = fast
            n += 1
    return n


__all__ = ["use_fast_dora_norm"]
