"""The training loss at the loss positions only, every assistant turn supervised, the fast DoRA norm,
and a learning-rate schedule sized to the run (real MLX on the smoke model)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, write_jsonl
from fishtune.errors import run_cli
from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

import mlx.core as mx  # noqa: E402  (after fishtune: OpenBLAS first)
import mlx.nn as nn  # noqa: E402


@pytest.fixture(scope="module")
def dora_model(smoke_model_dir):
    """The smoke model with DoRA on every linear and random non-zero adapter weights."""
    from mlx.utils import tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from fishtune.loading import load_base

    model, tokenizer, _ = load_base(str(smoke_model_dir))
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 2.0, "dropout": 0.0}, use_dora=True)
    model.update(tree_map(lambda x: mx.random.normal(x.shape) * 0.1, model.trainable_parameters()))
    return model, tokenizer


def full_logits_loss(model, tokens, positions, weights, denom=None):
    """The reference: logits and cross-entropy at EVERY position, then the weighted mean at ``positions``."""
    logits = model(tokens[:, :-1])
    ce = nn.losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    w = mx.zeros(ce.shape).at[positions].add(weights)
    return (ce * w).sum() / w.sum(), w.sum()


def _grads(model, fn, batch):
    from mlx.utils import tree_flatten

    (loss, n), grads = nn.value_and_grad(model, fn)(model, *batch)
    return float(loss), int(n), dict(tree_flatten(grads))


def _max_rel(a: dict, b: dict) -> float:
    return max(float(mx.abs(a[k] - b[k]).max() / (mx.abs(b[k]).max() + 1e-30)) for k in b)


@pytest.mark.parametrize("keep_bytes", [0, 2**40], ids=["recompute", "keep"])
def test_loss_and_gradients_equal_the_full_logits_computation(dora_model, tiny_data_dir, keep_bytes):
    """Gathered hidden states + chunked log-sum-exp = full logits, loss and every gradient (relative 1e-5),
    with the chunk exps recomputed in the backward pass or kept from the forward pass."""
    from fishtune.fileio import read_jsonl
    from fishtune.train import loss as loss_mod
    from fishtune.train.batches import TokenDataset, make_batch
    from fishtune.train.examples import build_examples

    model, tok = dora_model
    exs, _ = build_examples(read_jsonl(tiny_data_dir / "train.jsonl"), tok, get_template(), DEFAULT_SYSTEM_PROMPT,
                            mask_prompt=True, max_seq_length=128, name="train")
    ds = TokenDataset(exs, batch_size=3, seed=0)
    batch = make_batch(ds, ds.batch_for_step(1), 128)
    ref = _grads(model, full_logits_loss, batch[:3])
    old = loss_mod.VOCAB_CHUNK, loss_mod.KEEP_PROBS_BYTES
    try:
        loss_mod.VOCAB_CHUNK = 5000  # several chunks over the vocabulary, an uneven last one
        loss_mod.KEEP_PROBS_BYTES = keep_bytes
        got = _grads(model, loss_mod.masked_loss, batch[:3])
    finally:
        loss_mod.VOCAB_CHUNK, loss_mod.KEEP_PROBS_BYTES = old
    assert got[1] == ref[1] == sum(exs[i].n_loss for i in ds.batch_for_step(1))
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert _max_rel(got[2], ref[2]) < 1e-5


def test_fast_dora_norm_equals_mlx_lm(dora_model, smoke_model_dir):
    """The closed-form DoRA norm gives MLX-LM's DoRALinear outputs and gradients."""
    import copy

    from fishtune.train.dora import use_fast_dora_norm
    from fishtune.train.loss import masked_loss

    model, _ = dora_model
    fast = copy.deepcopy(model)
    assert use_fast_dora_norm(fast) == 7 * len(model.layers)
    rng = np.random.default_rng(1)
    tokens = mx.array(rng.integers(0, 150000, size=(2, 33)).astype(np.int32))
    positions = mx.array(np.arange(0, 64, 3, dtype=np.int32))
    batch = (tokens, positions, mx.ones(positions.shape))
    ref, got = _grads(model, masked_loss, batch), _grads(fast, masked_loss, batch)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert _max_rel(got[2], ref[2]) < 1e-5
    # Same parameters (the adapter file does not change), same fused weights for the exports.
    from mlx.utils import tree_flatten

    names = [k for k, _ in tree_flatten(fast.trainable_parameters())]
    assert names == [k for k, _ in tree_flatten(model.trainable_parameters())] and "_row_sq" not in str(names)
    a = fast.model.layers[0].mlp.up_proj.fuse().weight
    b = model.model.layers[0].mlp.up_proj.fuse().weight
    assert float(mx.abs(a - b).max()) == 0.0


def test_every_assistant_turn_of_a_three_turn_record_is_supervised(tokenizer_dir_model):
    from fishtune.train.examples import build_examples

    tok = tokenizer_dir_model
    tpl = get_template("alpaca")
    msgs = [
        {"role": "user", "content": "金鱼身上有白点"}, {"role": "assistant", "content": "可能是白点病。"},
        {"role": "user", "content": "要加盐吗？"}, {"role": "assistant", "content": "可以，3–5‰。"},
        {"role": "user", "content": "多久能好？"}, {"role": "assistant", "content": "一般7–10天。"},
    ]
    # Both shapes reach training: a messages record, and process_data's row (question/answer + history).
    rows = [{"messages": msgs},
            {"question": msgs[4]["content"], "answer": msgs[5]["content"], "history": msgs[:4]}]
    exs, rep = build_examples(rows, tok, tpl, DEFAULT_SYSTEM_PROMPT, mask_prompt=True, max_seq_length=512, name="t")
    assert rep.answers == 6
    full = tpl.render_conversation(msgs, DEFAULT_SYSTEM_PROMPT)
    for ex in exs:
        assert tok.decode(ex.tokens.tolist()) == full
        assert len(ex.spans) == 3
        supervised = [tok.decode(ex.tokens[s:e].tolist()) for s, e in ex.spans]
        assert supervised == [m["content"] + tpl.end_token for m in msgs if m["role"] == "assistant"]
        # the loss positions are exactly the targets of those tokens (predicted from the token before)
        assert ex.loss_positions().tolist() == [k - 1 for s, e in ex.spans for k in range(s, e)]
        assert ex.n_loss == sum(e - s for s, e in ex.spans)


@pytest.fixture(scope="module")
def tokenizer_dir_model(smoke_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(smoke_model_dir)


@pytest.mark.parametrize("iters", [12, 60])
def test_shipped_schedule_follows_the_run(iters, smoke_model_dir, tmp_path):
    """The shipped lora_config.yaml sizes warmup and decay to this run's optimizer updates."""
    from fishtune.train.cli import main

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"question": f"问题{i}", "answer": "回答" * (1 + i % 3)} for i in range(8)])
    adapter = tmp_path / "a"
    argv = ["--model", smoke_model_dir, "--data", data, "--adapter-path", adapter, "--iters", iters,
            "--batch-size", "1", "--max-seq-length", "64", "--steps-per-report", "2", "--steps-per-eval", "1000",
            "--save-every", "1000", "--num-layers", "1", "-c", REPO / "lora_config.yaml", "--no-progress"]
    assert run_cli(main)([str(a) for a in argv]) == 0
    rows = [json.loads(x) for x in (adapter / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    lr = {r["step"] // 2: r["learning_rate"] for r in rows if r["kind"] == "train"}  # update -> LR after it
    updates = iters // 2  # grad_accumulation_steps 2 in the shipped file
    floor = 1e-5  # lr_schedule.arguments[2]
    assert lr[updates // 2] > 2 * floor, lr
    assert lr[updates] == pytest.approx(floor, rel=1e-4), lr
    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    warmup = cfg["lr_schedule"]["warmup"]
    assert warmup == max(1, round(0.1 * updates)) and cfg["lr_schedule"]["arguments"][1] == updates - warmup - 2
