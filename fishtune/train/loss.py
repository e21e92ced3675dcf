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
   them: only ``[positions x VOCAB_CHUNK]`` logits per stream exist at any
   time (while ``[positions x vocab]`` floats fit in ``KEEP_PROBS_BYTES``,
   the forward pass keeps its exps instead: one exp pass and one matmul
   fewer). On MLX's CPU backend the chunks alternate between CPU streams (one
   thread each), so the exp/sum work, which MLX runs on one thread per
   stream, uses every core (measured: 0.83 -> 0.59 s for fwd+bwd over 160
   positions on 2 cores, ``bench/README.md``);
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

from typing import Any, Iterator

VOCAB_CHUNK = 16384  # rows of the output matrix per chunk: [positions x 16384] float32 logits at a time
MAX_STREAMS = 4  # CPU streams the chunks alternate between (at most one per core)
# Up to this much, the forward pass keeps each chunk's exp for the backward pass (one exp pass and
# one matmul fewer); beyond it, the backward pass recomputes them chunk by chunk. 512 MiB = 883
# loss positions x 151936 float32: the seed run's batches (4 rows, ~600 answer tokens) keep, a
# batch of four 1024-token answers recomputes. Either way far below the full logits of every token.
KEEP_PROBS_BYTES = 512 * 2**20


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


def _streams() -> list[Any]:
    """The streams the vocabulary chunks alternate between: one per core on the CPU, the default elsewhere."""
    import os

    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    n = max(1, min(os.cpu_count() or 1, MAX_STREAMS))
    return [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(n - 1)]


def _chunks(w: Any, streams: list[Any]) -> Iterator[tuple[int, Any, Any]]:
    """``(stream index, stream, rows of w)`` for each vocabulary chunk, round robin over the streams."""
    for j, i in enumerate(range(0, w.shape[0], VOCAB_CHUNK)):
        yield j % len(streams), streams[j % len(streams)], w[i : i + VOCAB_CHUNK]


def _sum(parts: list[Any]) -> Any:
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def _make_logsumexp():
    import mlx.core as mx

    streams = _streams()

    @mx.custom_function
    def logsumexp_rows(h, w):
        """``logsumexp(h @ w.T, axis=-1)`` without holding all the logits."""
        parts = []
        for _, stream, wc in _chunks(w, streams):
            with mx.stream(stream):
                parts.append(mx.logsumexp(h @ wc.T, axis=-1))
        return mx.logsumexp(mx.stack(parts, axis=-1), axis=-1)

    @logsumexp_rows.vjp
    def logsumexp_rows_vjp(primals, cotangent, output):
        # d lse / d h = softmax(h @ w.T) @ w, one chunk at a time. The output
        # matrix is frozen (LoRA/DoRA; full fine-tuning trains the blocks), so
        # its cotangent is a lazy zero that nothing evaluates.
        h, w = primals
        acc: list[Any] = [None] * len(streams)
        for k, stream, wc in _chunks(w, streams):
            with mx.stream(stream):
                d = (mx.exp(h @ wc.T - output[:, None]) * cotangent[:, None]) @ wc
                acc[k] = d if acc[k] is None else acc[k] + d
        return _sum([a for a in acc if a is not None]), mx.zeros_like(w)

    return logsumexp_rows


def _make_logsumexp_keeping():
    """Like ``_make_logsumexp``, but the forward pass keeps each chunk's ``exp`` for the backward pass.

    Half the exp work and one matmul fewer, for ``[positions x vocab]`` floats
    of memory: used while that stays under ``KEEP_PROBS_BYTES``.
    """
    import mlx.core as mx

    streams = _streams()

    @mx.custom_function
    def logsumexp_rows(h, w):
        maxes, exps, sums = [], [], []
        for _, stream, wc in _chunks(w, streams):
            with mx.stream(stream):
                logits = h @ wc.T
                m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
                e = mx.exp(logits - m)
                maxes.append(m)
                exps.append(e)
                sums.append(e.sum(axis=-1, keepdims=True))
        top = maxes[0]
        for m in maxes[1:]:
            top = mx.maximum(top, m)
        lse = top + mx.log(_sum([s * mx.exp(m - top) for s, m in zip(sums, maxes)]))
        # softmax of chunk c = exps[c] * scales[c]; returned so the VJP can reuse them
        return (lse[:, 0], *exps, *[mx.exp(m - lse) for m in maxes])

    @logsumexp_rows.vjp
    def logsumexp_rows_vjp(primals, cotangents, outputs):
        h, w = primals
        n = (len(outputs) - 1) // 2
        exps, scales = outputs[1 : 1 + n], outputs[1 + n :]
        g = cotangents[0][:, None]
        acc: list[Any] = [None] * len(streams)
        for (j, stream, wc), e, c in zip(_chunks(w, streams), exps, scales):
            with mx.stream(stream):
                d = (e * (c * g)) @ wc
                acc[j] = d if acc[j] is None else acc[j] + d
        return _sum([a for a in acc if a is not None]), mx.zeros_like(w)

    return logsumexp_rows


_LOGSUMEXP: dict[str, Any] = {}


def chunked_cross_entropy(h: Any, w: Any, targets: Any) -> Any:
    """Per-position cross-entropy of ``h @ w.T`` against ``targets``, over the vocabulary in chunks."""
    keep = h.shape[0] * w.shape[0] * 4 <= KEEP_PROBS_BYTES  # shapes are static inside mx.compile
    kind = "keep" if keep else "recompute"
    if kind not in _LOGSUMEXP:
        _LOGSUMEXP[kind] = _make_logsumexp_keeping() if keep else _make_logsumexp()
    lse = _LOGSUMEXP[kind](h, w)
    return (lse[0] if keep else lse) - (h * w[targets]).sum(axis=-1)


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
