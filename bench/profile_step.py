"""Where a training step's time goes: the whole step and its parts, before and after each change.

On the bench model (hidden 512, 8 layers, Qwen2's 151936-token vocabulary,
float32, DoRA rank 8 on every linear, gradient checkpointing) and one real
batch of the bench data (batch x max_seq_length tokens, the prompt masked),
it times, alternating the variants so machine load hits all alike:

* ``step``: value_and_grad of the loss + the AdamW update, compiled, as
  ``fishtune.train.trainer`` runs it: the old loss (full logits at every
  position, MLX-LM's DoRA norm) against the new one (hidden states gathered
  at the loss positions, chunked log-sum-exp, closed-form DoRA norm), and
  each change alone;
* ``head``: the output layer + cross-entropy alone, forward and backward to
  the hidden states: full logits, gathered, gathered + chunked;
* ``dora_norm``: one forward of every adapted linear's norm, MLX-LM's against
  the closed form;
* ``backbone``: the transformer blocks alone (forward + backward, no output layer).

Prints a table and writes ``bench/results/profile_step.json`` (medians over
``--repeats`` alternating rounds).

    python bench/profile_step.py [--batch-size 2] [--max-seq-length 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fishtune  # noqa: E402,F401  (OpenBLAS before mlx)
from common import WORK, alternate, load_average, log, median, quiet_note, write_result  # noqa: E402
from fixtures import build_model, make_data  # noqa: E402


def full_logits_loss(model, tokens, positions, weights, denom=None):
    """The loss before the change: logits and cross-entropy at every position, masked afterwards."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(tokens[:, :-1])
    ce = nn.losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    w = mx.zeros(ce.shape).at[positions].add(weights)
    n = w.sum()
    return (ce * w).sum() / (denom if denom is not None else mx.maximum(n, 1)), n


def build(model_dir: Path, fast_dora: bool):
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from fishtune.loading import load_base
    from fishtune.train.dora import use_fast_dora_norm

    model, tok, _ = load_base(str(model_dir))
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 2.0, "dropout": 0.05}, use_dora=True)
    if fast_dora:
        use_fast_dora_norm(model)
    return model, tok


def step_fn(model, loss):
    """The trainer's compiled update step (value_and_grad + AdamW), with grad checkpointing."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    opt = optim.AdamW(learning_rate=1e-4, weight_decay=1e-4, bias_correction=True)
    opt.init(model.trainable_parameters())
    vg = nn.value_and_grad(model, loss)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (lv, n), g = vg(model, *batch)
        opt.update(model, g)
        return lv

    def run(batch):
        mx.eval(step(batch), state)


    return run


def timed(fn, n: int) -> float:
    fn()  # warm-up: compile, allocate
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds (median of their best-of-3)")
    a = ap.parse_args(argv)

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import grad_checkpoint

    from fishtune.fileio import read_jsonl
    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template
    from fishtune.train import loss as loss_mod
    from fishtune.train.batches import TokenDataset, make_batch
    from fishtune.train.examples import build_examples

    load0 = load_average()
    model_dir = build_model(WORK / "bench-model", "bench")
    data = WORK / f"data-{a.max_seq_length}"
    make_data(data, model_dir, a.max_seq_length)
    slow, tok = build(model_dir, fast_dora=False)
    fast = copy.deepcopy(slow)
    from fishtune.train.dora import use_fast_dora_norm

    use_fast_dora_norm(fast)
    grad_checkpoint(slow.layers[0])  # patches the block class: both models
    exs, _ = build_examples(read_jsonl(data / "train.jsonl"), tok, get_template(), DEFAULT_SYSTEM_PROMPT,
                            mask_prompt=True, max_seq_length=a.max_seq_length, name="bench")
    ds = TokenDataset(exs, a.batch_size, seed=0)
    batch = make_batch(ds, ds.batch_for_step(1), a.max_seq_length)
    n_loss = int(batch[2].sum())
    tokens = a.batch_size * a.max_seq_length
    log(f"batch {a.batch_size} x {a.max_seq_length}: {n_loss} loss positions ({len(batch[1])} slots)")

    # -- the parts
    hidden = slow.model(batch[0][:, :-1])
    mx.eval(hidden)
    H = hidden.shape[-1]
    flat = hidden.reshape(-1, H)
    W = slow.model.embed_tokens.weight
    targets_all = batch[0][:, 1:].reshape(-1)
    targets = targets_all[batch[1]]

    def head_full(h):
        ce = nn.losses.cross_entropy(h @ W.T, targets_all)
        return (ce * mx.zeros(ce.shape).at[batch[1]].add(batch[2])).sum()

    def head_gathered(h):
        return (nn.losses.cross_entropy(h[batch[1]] @ W.T, targets) * batch[2]).sum()

    def head_chunked(h):
        return (loss_mod.chunked_cross_entropy(h[batch[1]], W, targets) * batch[2]).sum()

    heads = {k: mx.grad(f) for k, f in
             (("head_full_logits", head_full), ("head_gathered", head_gathered), ("head_gathered_chunked", head_chunked))}

    def dora_norms(model):
        outs = []
        for _, m in model.named_modules():
            if hasattr(m, "lora_b"):
                if hasattr(m, "_row_sq"):
                    a_, b_ = m.lora_a, m.lora_b
                    w = m.linear.weight
                    outs.append(mx.sqrt(m._row_sq.value + 2 * m.scale * ((w @ a_) * b_.T).sum(1)
                                        + m.scale ** 2 * ((b_.T @ (a_.T @ a_)) * b_.T).sum(1)))
                else:
                    w = m.linear.weight
                    outs.append(mx.linalg.norm(w + (m.scale * m.lora_b.T) @ m.lora_a.T, axis=1))
        mx.eval(outs)

    def backbone(model):
        r = mx.random.normal(hidden.shape)
        g = nn.value_and_grad(model, lambda m, x: (m.model(x) * r).sum())
        return lambda: mx.eval(g(model, batch[0][:, :-1]))

    halves = _row_halves(ds, a.batch_size, a.max_seq_length)
    variants = {
        "step_before": (step_fn(copy.deepcopy(slow), full_logits_loss), batch),
        "step_gather_only": (step_fn(copy.deepcopy(slow), partial(_gather_only, loss_mod)), batch),
        "step_gather_chunked_1_stream": (step_fn(copy.deepcopy(slow), partial(_one_stream, loss_mod)), batch),
        "step_gather_chunked_recompute": (step_fn(copy.deepcopy(slow), partial(_recompute, loss_mod)), batch),
        "step_gather_chunked": (step_fn(copy.deepcopy(slow), loss_mod.masked_loss), batch),
        "step_after": (step_fn(copy.deepcopy(fast), loss_mod.masked_loss), batch),
        "step_after_rows_on_2_streams": (step_fn(copy.deepcopy(fast), partial(_rows_on_streams, loss_mod)), halves),
    }
    runs: dict[str, list[float]] = {}
    parts = {
        **{f"{k}": (lambda f=f: mx.eval(f(flat))) for k, f in heads.items()},
        "dora_norm_mlx_lm": lambda: dora_norms(slow),
        "dora_norm_closed_form": lambda: dora_norms(fast),
        "backbone_mlx_lm_dora": backbone(slow),
        "backbone_fast_dora": backbone(fast),
    }
    names = list(variants) + list(parts)
    for _rep, name in alternate(names, a.repeats):
        fn, args = variants.get(name, (None, None))
        t = timed((lambda f=fn, b=args: f(b)) if fn is not None else parts[name], 3)
        runs.setdefault(name, []).append(t)
        log(f"{name:24s} {t:.3f} s")
    summary = {k: {"median_s": median(v), "best_s": min(v)} for k, v in runs.items()}
    before = summary["step_before"]["median_s"]
    for k, v in summary.items():
        if k.startswith("step_"):
            v["speedup_vs_before"] = before / v["median_s"]
            v["tokens_per_s"] = tokens / v["median_s"]
    path = write_result("profile_step", {
        "settings": {"batch_size": a.batch_size, "max_seq_length": a.max_seq_length, "tokens": tokens,
                     "loss_positions": n_loss, "loss_slots": int(len(batch[1])), "repeats": a.repeats,
                     "model": "bench/work/bench-model (hidden 512, 8 layers, vocab 151936, float32)",
                     "adapter": "DoRA rank 8 scale 2 dropout 0.05, all linears, grad checkpoint, AdamW"},
        "summary": summary,
        "load_note": quiet_note(load0, load_average()),
        "command": "python bench/profile_step.py " + " ".join(argv or sys.argv[1:]),
    })
    log(f"wrote {path}")
    for k, v in summary.items():
        extra = f"  x{v['speedup_vs_before']:.2f}" if "speedup_vs_before" in v else ""
        log(f"{k:24s} median {v['median_s']:.3f} s  best {v['best_s']:.3f} s{extra}")
    return 0


def _one_stream(loss_mod, model, *batch):
    """The chunked loss with every vocabulary chunk on the default stream (one thread for the exp/sum work)."""
    saved = loss_mod.MAX_STREAMS, dict(loss_mod._LOGSUMEXP)
    loss_mod.MAX_STREAMS = 1
    loss_mod._LOGSUMEXP.clear()
    try:
        return loss_mod.masked_loss(model, *batch)
    finally:
        loss_mod.MAX_STREAMS = saved[0]
        loss_mod._LOGSUMEXP.clear()
        loss_mod._LOGSUMEXP.update(saved[1])


def _recompute(loss_mod, model, *batch):
    """The chunked loss with the backward pass recomputing every chunk's logits (nothing kept)."""
    saved = loss_mod.KEEP_PROBS_BYTES
    loss_mod.KEEP_PROBS_BYTES = 0
    try:
        return loss_mod.masked_loss(model, *batch)
    finally:
        loss_mod.KEEP_PROBS_BYTES = saved


def _row_halves(ds, batch_size: int, max_len: int):
    """The step-1 batch as two half batches (for ``_rows_on_streams``), with the global denominator."""
    from fishtune.train.batches import make_batch

    rows = ds.batch_for_step(1)
    parts = [make_batch(ds, rows, max_len, rank, 2) for rank in range(2)]
    return (*parts[0][:3], *parts[1][:3], make_batch(ds, rows, max_len)[3])  # the whole batch's token count


def _rows_on_streams(loss_mod, model, t0, p0, w0, t1, p1, w1, denom):
    """Data parallel inside one process: each half of the batch on its own CPU stream (thread)."""
    import mlx.core as mx

    if not _STREAM:
        _STREAM.append(mx.new_stream(mx.cpu))
    streams = [mx.default_stream(mx.cpu), _STREAM[0]]
    out = []
    for s, (t, p, w) in zip(streams, ((t0, p0, w0), (t1, p1, w1))):
        with mx.stream(s):
            out.append(loss_mod.masked_loss(model, t, p, w, denom))
    return out[0][0] + out[1][0], out[0][1] + out[1][1]


_STREAM: list = []


def _gather_only(loss_mod, model, tokens, positions, weights, denom=None):
    """Hidden states gathered at the loss positions, then the full-vocabulary cross-entropy (no chunks)."""
    import mlx.core as mx
    import mlx.nn as nn

    backbone, head = loss_mod.output_layer(model)
    h = backbone(tokens[:, :-1])
    h = h.reshape(-1, h.shape[-1])[positions]
    ce = nn.losses.cross_entropy(h @ head.T, tokens[:, 1:].reshape(-1)[positions])
    n = weights.sum()
    return (ce * weights).sum() / (denom if denom is not None else mx.maximum(n, 1)), n


if __name__ == "__main__":
    sys.exit(main())
