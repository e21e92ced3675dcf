"""The training loss: cross-entropy over the completion tokens only.

``masked_loss`` is MLX-LM's ``default_loss`` with two changes: the mask
stops at the last real token (MLX-LM 0.32.2 counts one padding position
per row, training every row to predict token id 0 after its end token),
and the sum is divided by a denominator the batch carries, so that data
parallel ranks together compute exactly the single-process mean over the
global batch.
"""
from __future__ import annotations

from typing import Any


def masked_loss(model: Any, batch: Any, lengths: Any, denom: Any = None):
    """Cross-entropy over the completion tokens only.

    Target ``k`` is token ``k+1`` of the row; it carries loss iff
    ``offset <= k+1 < length``. Returns ``(sum / denom, n_loss_tokens)``;
    without ``denom`` the plain mean.
    """
    import mlx.core as mx
    import mlx.nn as nn

    inputs = batch[:, :-1]
    targets = batch[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    if denom is None:
        denom = mx.maximum(ntoks, 1)
    return ce.astype(mx.float32).sum() / denom, ntoks


__all__ = ["masked_loss"]
