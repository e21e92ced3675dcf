"""The training loss: cross-entropy at the loss positions only, over the vocabulary in chunks.

With Qwen2's 151936-token vocabulary the output layer and its softmax are a
large part of every step, and MLX's CPU backend runs the softmax on one
thread. So the loss never builds the ``[tokens x vocab]`` logits of the
whole batch:

1. the transformer runs to its final hidden states ``[rows, width, hidden]``;
2. the hidden states are gathered at the batch's loss positions (answer
   tokens and end tokens of every assistant turn; no prompt, no padding),
   padded to a few fixed sizes with zero weights (``batches.loss_slots``) so
   ``mx.compile`` does not retrace for every batch;
3. the log-sum-exp over the vocabulary is computed in chunks of
   ``VOCAB_CHUNK`` rows of the output matrix, with a custom VJP that
   recomputes each chunk's logits in the backward pass instead of keeping
   them: only ``[positions x VOCAB_CHUNK]`` logits exist at any time;
4. the target's logit is the dot product of the hidden state with the
   target's row of the output matrix.

``loss = sum(weight * (logsumexp - target logit)) / denom``: the batch carries
``denom`` so that data-parallel ranks together compute exactly the
single-process mean over the global batch. Unlike MLX-LM 0.32.2's
``default_loss`` no padding position counts (it trains every row to predict
token 0 after its end token). Models whose output layer is not a plain
float matrix (a quantized base, QLoRA) get the same gather, with the
output layer's own call on the gathered states.
"""
from __future__ import annotations

from typing import Any

VOCAB_CHUNK = 16384  # rows of the output matrix per chunk: [positions x 16384] float32 logits at a time


def output_layer(model: Any) -> tuple[Any, Any] | None:
    """``(backbone, head)`` of an MLX-LM causal LM, or None when its shape is unknown.

    ``backbone(inputs)`` gives the final (normed) hidden states; ``head`` is
    the float ``[vocab, hidden]`` output matrix (tied embeddings or
    ``lm_head``), or the output module itself when it is quantized.
    """
    import mlx.nn as nn

    inner = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if inner is None or args is None:
        return None
    layer = inner.embed_tokens if getattr(args, "tie_word_embeddings", False) else getattr(model, "lm_head", None)
    if isinstance(layer, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        return inner, (layer.as_linear if isinstance(layer, nn.QuantizedEmbedding) else layer)
    if isinstance(layer, (nn.Embedding, nn.Linear)) and "bias" not in layer:
        return inner, layer.weight
    return None


def _chunks(n: int) -> range:
    return range(0, n, VOCAB_CHUNK)


def _make_logsumexp():
    import mlx.core as mx

    @mx.custom_function
    def logsumexp_rows(h, w):
        """``logsumexp(h @ w.T, axis=-1)`` without holding all the logits."""
        parts = [mx.logsumexp(h @ w[i : i + VOCAB_CHUNK].T, axis=-1) for i in _chunks(w.shape[0])]
        return mx.logsumexp(mx.stack(parts, axis=-1), axis=-1)

    @logsumexp_rows.vjp
    def logsumexp_rows_vjp(primals, cotangent, output):
        # d lse / d h = softmax(h @ w.T) @ w, one chunk at a time. The output
        # matrix is frozen (LoRA/DoRA; full fine-tuning trains the blocks), so
        # its cotangent is a lazy zero that nothing evaluates.
        h, w = primals
        dh = None
        for i in _chunks(w.shape[0]):
            wc = w[i : i + VOCAB_CHUNK]
            p = mx.exp(h @ wc.T - output[:, None]) * cotangent[:, None]
            dh = p @ wc if dh is None else dh + p @ wc
        return dh, mx.zeros_like(w)

    return logsumexp_rows


_LOGSUMEXP: list[Any] = []


def chunked_cross_entropy(h: Any, w: Any, targets: Any) -> Any:
    """Per-position cross-entropy of ``h @ w.T`` against ``targets``, over the vocabulary in chunks."""
    if not _LOGSUMEXP:
        _LOGSUMEXP.append(_make_logsumexp())
    return _LOGSUMEXP[0](h, w) - (h * w[targets]).sum(axis=-1)


def masked_loss(model: Any, tokens: Any, positions: Any, weights: Any, denom: Any = None):
    """Cross-entropy over the targets at ``positions`` (flat indices into ``tokens[:, 1:]``).

    Returns ``(sum(weights * ce) / denom, number of weighted targets)``;
    without ``denom`` the plain mean. The batch is ``batches.make_batch``'s.
    """
    import mlx.core as mx
    import mlx.nn as nn

    inputs = tokens[:, :-1]
    targets = tokens[:, 1:].reshape(-1)[positions]
    parts = output_layer(model)
    if parts is None:  # an unknown model: its own logits, gathered
        logits = model(inputs)
        ce = nn.losses.cross_entropy(logits.reshape(-1, logits.shape[-1])[positions], targets)
    else:
        backbone, head = parts
        hidden = backbone(inputs)
        h = hidden.reshape(-1, hidden.shape[-1])[positions].astype(mx.float32)
        if callable(head):
            ce = nn.losses.cross_entropy(head(h).astype(mx.float32), targets)
        else:
            ce = chunked_cross_entropy(h, head.astype(mx.float32), targets)
    ntoks = weights.sum()
    if denom is None:
        denom = mx.maximum(ntoks, 1)
    return (ce.astype(mx.float32) * weights).sum() / denom, ntoks


__all__ = ["masked_loss", "chunked_cross_entropy", "output_layer", "VOCAB_CHUNK"]
