"""finetune.py: masking, batching, outputs, config, errors, LoRA/DoRA/full/QLoRA.

Real MLX-LM training on the tiny random smoke model (a handful of steps).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_records, write_jsonl
from fishtune.errors import UserError, run_cli

import mlx.core as mx  # noqa: E402  (after fishtune: OpenBLAS first)


from fishtune.train import cli as finetune  # noqa: E402  (finetune.py's main)


def cli(*argv: str) -> int:
    return run_cli(finetune.main)([str(a) for a in argv] + ["--no-progress"])


def fast_flags(model: Path, data: Path, adapter: Path, **kw) -> list[str]:
    """Small, fast settings; ``kw`` overrides (flag names with underscores)."""
    flags = {
        "model": model, "data": data, "adapter_path": adapter, "batch_size": 2, "iters": 2,
        "max_seq_length": 96, "steps_per_eval": 100, "steps_per_report": 1, "save_every": 100,
        "learning_rate": 1e-2, "num_layers": 2, "seed": 7,
    }
    flags.update(kw)
    out: list[str] = []
    for k, v in flags.items():
        if v is None:
            continue
        if v is True:
            out.append("--" + k.replace("_", "-"))
        else:
            out += ["--" + k.replace("_", "-"), str(v)]
    return out


@pytest.fixture(scope="module")
def tokenizer(smoke_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(Path(smoke_model_dir))


@pytest.fixture(scope="module")
def model_and_tokenizer(smoke_model_dir):
    import mlx_lm

    return mlx_lm.load(str(smoke_model_dir))


# ---------------------------------------------------------------------------
# Examples and masking (no training)
# ---------------------------------------------------------------------------
def test_examples_mask_the_prompt_and_end_with_the_end_token(tokenizer):
    from fishtune.train.examples import build_examples
    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

    tpl = get_template("alpaca")
    rows = tiny_records(3)
    exs, rep = build_examples(rows, tokenizer, tpl, DEFAULT_SYSTEM_PROMPT, mask_prompt=True,
                              max_seq_length=512, name="train.jsonl")
    assert rep.masked == 3 and rep.raw_text == 0 and rep.truncated == 0
    for ex, row in zip(exs, rows):
        prompt, completion = tpl.split_for_training(
            [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}],
            DEFAULT_SYSTEM_PROMPT,
        )
        assert tokenizer.decode(ex.tokens[: ex.offset].tolist()) == prompt
        assert tokenizer.decode(ex.tokens[ex.offset:].tolist()) == completion
        assert ex.tokens[-1] == tokenizer.convert_tokens_to_ids(tpl.end_token)  # learns to stop
        assert ex.n_loss == ex.length - ex.offset

    # Raw mlx_lm rows (only "text") train on the whole text; long rows are truncated and counted.
    raw = [{"text": rows[0]["text"]}, {"text": "短"}]
    exs, rep = build_examples(raw, tokenizer, tpl, DEFAULT_SYSTEM_PROMPT, mask_prompt=True,
                              max_seq_length=20, name="raw.jsonl")
    assert [e.offset for e in exs] == [0, 0] and rep.raw_text == 2
    assert rep.truncated == 1 and exs[0].length == 20
    assert any("only 'text'" in n for n in rep.notes) and any("truncated" in n for n in rep.notes)

    # --no-mask-prompt: loss on everything.
    exs, _ = build_examples(rows, tokenizer, tpl, DEFAULT_SYSTEM_PROMPT, mask_prompt=False,
                            max_seq_length=512, name="t")
    assert all(e.offset == 0 for e in exs)


def test_bad_records_name_the_line(tokenizer, tmp_path):
    from fishtune.fileio import read_jsonl
    from fishtune.train.examples import build_examples
    from fishtune.template import get_template

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"train.jsonl:2: not valid JSON"):
        read_jsonl(bad)
    with pytest.raises(UserError, match=r"x.jsonl:1: field 'answer' must be a non-empty string"):
        build_examples([{"question": "q", "answer": ""}], tokenizer, get_template(), None,
                       mask_prompt=True, max_seq_length=64, name="x.jsonl")
    with pytest.raises(UserError, match=r"x.jsonl:1: record has none of"):
        build_examples([{"foo": 1}], tokenizer, get_template(), None, mask_prompt=True, max_seq_length=64,
                       name="x.jsonl")


def test_masked_tokens_contribute_no_loss(model_and_tokenizer):
    """The loss equals a hand computation over the answer tokens only (no prompt, no padding)."""
    from mlx_lm.tuner.trainer import default_loss

    from fishtune.train.loss import masked_loss

    model, _ = model_and_tokenizer
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5000, size=(2, 33)).astype(np.int32)
    lengths = np.array([[10, 30], [5, 20]], dtype=np.int32)  # (offset, length)
    tokens[1, 20:] = 0  # padding
    # targets t in offset..length-1, predicted from position t-1; 3 extra slots with weight 0
    pos = [r * 32 + t - 1 for r, (off, n) in enumerate(lengths) for t in range(off, n)] + [0, 0, 0]
    weights = np.array([1.0] * (len(pos) - 3) + [0.0] * 3, dtype=np.float32)
    batch = mx.array(tokens)
    loss, ntoks = masked_loss(model, batch, mx.array(np.array(pos, dtype=np.int32)), mx.array(weights))

    logits = np.array(model(batch[:, :-1]).astype(mx.float32))
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    picked = []
    for r, (off, n) in enumerate(lengths):
        for t in range(off, n):  # targets: tokens off..n-1 (the answer), predicted from position t-1
            picked.append(-logp[r, t - 1, tokens[r, t]])
    assert int(ntoks) == len(picked) == (30 - 10) + (20 - 5)
    assert float(loss) == pytest.approx(float(np.mean(picked)), rel=1e-5)

    # MLX-LM 0.32.2's default_loss counts one padding position per row; ours does not.
    _, ntoks_mlx = default_loss(model, batch, mx.array(lengths))
    assert int(ntoks_mlx) == int(ntoks) + 2


def test_batches_sorted_by_length_and_order_is_a_function_of_seed_and_step(tokenizer):
    from fishtune.train.batches import TokenDataset, iterate_batches, make_batch
    from fishtune.train.examples import build_examples
    from fishtune.template import get_template

    rows = tiny_records(8)
    for i, r in enumerate(rows):
        r["answer"] = r["answer"] * (1 + i % 3)
    exs, _ = build_examples(rows + rows[:3], tokenizer, get_template(), None, mask_prompt=True,
                            max_seq_length=512, name="t")
    ds = TokenDataset(exs, batch_size=4, seed=3)
    assert ds.n_batches == 3  # 11 records: the last batch holds 3 (plus one empty row)
    lens = [[exs[i].length for i in b] for b in ds.batches]
    assert all(max(a) <= min(b) for a, b in zip(lens, lens[1:]))
    assert ds.padding_fraction() <= ds.unsorted_padding_fraction()
    # Every record once per epoch; the order depends only on (seed, epoch).
    epoch0 = sorted(i for s in range(1, 4) for i in ds.batch_for_step(s))
    assert epoch0 == list(range(11))
    again = TokenDataset(exs, batch_size=4, seed=3)
    assert [again.batch_for_step(s) for s in range(1, 10)] == [ds.batch_for_step(s) for s in range(1, 10)]
    it = iterate_batches(ds, 4, 512, loop=True, start_step=4)
    tokens, _, _, _ = next(it)
    ref_tokens, _, _, _ = make_batch(ds, ds.batch_for_step(5), 512)
    assert np.array_equal(np.array(tokens), np.array(ref_tokens))
    # The short batch is filled with empty rows (no loss); widths are 1 + a multiple of 32.
    short = next(b for b in ds.batches if len(b) == 3)
    t, positions, weights, denom = make_batch(ds, short, 512)
    w = t.shape[1] - 1
    assert t.shape[0] == 4 and not np.array(t)[3].any() and w % 32 == 0
    assert not (np.array(positions)[np.array(weights) > 0] >= 3 * w).any()  # nothing from the empty row
    assert float(denom) == sum(exs[i].n_loss for i in short) == float(np.array(weights).sum())


# ---------------------------------------------------------------------------
# The command line: the seed's flags, outputs, config, refusal to overwrite
# ---------------------------------------------------------------------------
SEED_YAML = """\
# like the seed's lora_config.yaml
lora_parameters:
  rank: 4
  scale: 8.0
  dropout: 0.05
optimizer: adamw
"""


@pytest.fixture(scope="module")
def dora_run(smoke_model_dir, tiny_data_dir, tmp_path_factory):
    """The seed's full command line (python3 finetune.py in place of mlx_lm lora), tiny sizes."""
    tmp = tmp_path_factory.mktemp("dora")
    cfg = tmp / "lora_config.yaml"
    cfg.write_text(SEED_YAML, encoding="utf-8")
    adapter = tmp / "lora_qwen2_1.5b"
    argv = [
        "--model", smoke_model_dir, "--train", "--data", tiny_data_dir, "--fine-tune-type", "dora",
        "--batch-size", "2", "--iters", "4", "--learning-rate", "2e-2", "--max-seq-length", "96",
        "--grad-accumulation-steps", "2", "--seed", "42", "--save-every", "2", "--adapter-path", adapter,
        "--test", "--steps-per-eval", "2", "--steps-per-report", "1", "-c", cfg, "--num-layers", "2",
    ]
    assert cli(*argv) == 0
    return adapter, argv


def test_seed_command_line_writes_every_output(dora_run, smoke_model_dir):
    adapter, _ = dora_run
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss_curve.png",
                 "summary.json", "0000002_adapters.safetensors", "0000004_adapters.safetensors"):
        assert (adapter / name).is_file(), name
    assert (adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (adapter / "checkpoints").iterdir()) == ["0000002", "0000004"]

    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    # Flags and YAML honoured, resolved into MLX-LM's schema.
    assert cfg["fine_tune_type"] == "dora" and cfg["num_layers"] == 2 and cfg["batch_size"] == 2
    assert cfg["iters"] == 4 and cfg["learning_rate"] == pytest.approx(2e-2)
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["lora_parameters"]["scale"] == 8.0
    meta = cfg["fishtune"]
    assert meta["template"] == "alpaca" and meta["base_model"] == str(smoke_model_dir)
    assert meta["mask_prompt"] is True and meta["status"] == "finished" and meta["system_prompt"]

    from fishtune.project import read_project_meta

    assert read_project_meta(adapter).base_model == str(smoke_model_dir)

    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    test = [r for r in rows if r["kind"] == "test"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in val] == [0, 2, 4]
    for key in ("train_loss", "learning_rate", "tokens_per_sec", "loss_tokens_per_sec", "iterations_per_sec",
                "peak_memory_gb"):
        assert all(isinstance(r[key], float) for r in train), key
    assert all(r["tokens_per_sec"] > r["loss_tokens_per_sec"] > 0 for r in train)  # prompt tokens are not loss
    assert train[0]["learning_rate"] == pytest.approx(2e-2)
    assert val[-1]["val_loss"] < val[0]["val_loss"]  # it learns
    assert len(test) == 1 and test[0]["test_ppl"] == pytest.approx(np.exp(test[0]["test_loss"]), rel=1e-6)
    summary = json.loads((adapter / "summary.json").read_text(encoding="utf-8"))
    assert summary["test_loss"] == test[0]["test_loss"] and summary["steps"] == 4


def test_mlx_lm_loads_and_generates_with_the_adapter(dora_run, smoke_model_dir):
    import mlx_lm

    adapter, _ = dora_run
    model, tok = mlx_lm.load(str(smoke_model_dir), adapter_path=str(adapter))
    text = mlx_lm.generate(model, tok, "### Instruction:\n鱼病\n\n### Response:\n", max_tokens=3)
    assert isinstance(text, str)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(smoke_model_dir), "--adapter-path", str(adapter),
         "--prompt", "鱼", "--max-tokens", "2"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_finished_adapter_is_not_overwritten_and_test_only_mode(dora_run, caplog):
    adapter, argv = dora_run
    before = (adapter / "adapters.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"already holds a finished adapter \(4 steps\); pass --force"):
        finetune.main([str(a) for a in argv] + ["--no-progress"])
    assert cli(*argv) == 2
    assert (adapter / "adapters.safetensors").read_bytes() == before
    # --test without --train: evaluate the existing adapter (same test loss as after training).
    model, data = argv[1], argv[4]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert cli("--model", model, "--data", data, "--adapter-path", adapter, "--test", "--batch-size", "2",
                   "--max-seq-length", "96") == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Test loss"))
    summary = json.loads((adapter / "summary.json").read_text(encoding="utf-8"))
    assert float(line.split()[2].rstrip(",")) == pytest.approx(summary["test_loss"], abs=1e-4)
    assert (adapter / "adapters.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------
# Errors: one line, exit 2
# ---------------------------------------------------------------------------
def test_errors_are_one_line(smoke_model_dir, tiny_data_dir, tmp_path, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    with pytest.raises(UserError, match=r"nodata/train.jsonl not found"):
        finetune.main(fast_flags(smoke_model_dir, empty, tmp_path / "a"))
    (empty / "train.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"nodata/train.jsonl is empty"):
        finetune.main(fast_flags(smoke_model_dir, empty, tmp_path / "a"))
    with pytest.raises(UserError, match=r"model 'no-such-org/no-such-model' is not available offline .*hub can't be "
                                        r"reached.*--model .*make smoke-model"):
        finetune.main(fast_flags("no-such-org/no-such-model", tiny_data_dir, tmp_path / "a"))
    with pytest.raises(UserError, match=r"Requested to train 16 layers but the model only has 2"):
        finetune.main(fast_flags(smoke_model_dir, tiny_data_dir, tmp_path / "a", num_layers=16))
    capsys.readouterr()
    assert cli(*fast_flags(smoke_model_dir, empty, tmp_path / "a")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


# ---------------------------------------------------------------------------
# LoRA, full fine-tuning, QLoRA (and DoRA on a quantized base)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_lora_and_full_train_and_load(kind, smoke_model_dir, tiny_data_dir, tmp_path):
    import mlx_lm

    from mlx_lm.models.qwen2 import TransformerBlock

    adapter = tmp_path / kind
    call = TransformerBlock.__call__
    assert cli(*fast_flags(smoke_model_dir, tiny_data_dir, adapter, fine_tune_type=kind, num_layers=1,
                           grad_checkpoint=True)) == 0
    assert TransformerBlock.__call__ is call  # mlx_lm's class-wide grad-checkpoint patch was undone
    weights = mx.load(str(adapter / "adapters.safetensors"))
    if kind == "full":
        assert any(k.endswith("self_attn.q_proj.weight") for k in weights)
        assert not any("lora" in k for k in weights)
    else:
        assert any(k.endswith("lora_a") for k in weights) and not any(k.endswith(".m") for k in weights)
    mlx_lm.load(str(smoke_model_dir), adapter_path=str(adapter))


@pytest.fixture(scope="module")
def quantized_model(smoke_model_dir, tmp_path_factory):
    from mlx_lm.convert import convert

    out = tmp_path_factory.mktemp("q") / "smoke-q4"
    # 4-bit transformer blocks; the tied 151k-row embedding stays float (a
    # quantized lm_head is 10x slower on CPU and irrelevant to the adapters).
    convert(str(smoke_model_dir), str(out), quantize=True, q_group_size=32, q_bits=4,
            quant_predicate=lambda path, module, *_: "embed_tokens" not in path and "lm_head" not in path)
    return out


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_on_a_quantized_base(kind, quantized_model, tiny_data_dir, tmp_path):
    """QLoRA works; DoRA on a 4-bit base also works in MLX-LM 0.32.2 (DoRALinear dequantizes)."""
    import mlx_lm

    adapter = tmp_path / kind
    assert cli(*fast_flags(quantized_model, tiny_data_dir, adapter, fine_tune_type=kind)) == 0
    model, tok = mlx_lm.load(str(quantized_model), adapter_path=str(adapter))
    assert mlx_lm.generate(model, tok, "鱼", max_tokens=2) is not None
    with pytest.raises(UserError, match=r"full fine-tuning needs an unquantized base"):
        finetune.main(fast_flags(quantized_model, tiny_data_dir, tmp_path / "full", fine_tune_type="full"))


# ---------------------------------------------------------------------------
# Our loop is MLX-LM's train(), plus resume/metrics/checkpoints
# ---------------------------------------------------------------------------
def test_loop_matches_mlx_lm_train(smoke_model_dir, tiny_data_dir, tmp_path):
    """Same batches, same loss: MLX-LM's own train() ends with the same adapter as ours."""
    import mlx.optimizers as optim
    import mlx_lm
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from fishtune.fileio import read_jsonl
    from fishtune.train.batches import TokenDataset, iterate_batches
    from fishtune.train.examples import build_examples
    from fishtune.train.loss import masked_loss
    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

    ours = tmp_path / "ours"
    assert cli(*fast_flags(smoke_model_dir, tiny_data_dir, ours, iters=3, fine_tune_type="lora", num_layers=2,
                           grad_accumulation_steps=1, optimizer="adam", learning_rate=1e-2), "-c",
               _yaml(tmp_path, "lora_parameters: {rank: 4, scale: 8.0, dropout: 0.0}\n")) == 0

    model, tok = mlx_lm.load(str(smoke_model_dir))
    rows = read_jsonl(tiny_data_dir / "train.jsonl")
    exs, _ = build_examples(rows, tok, get_template(), DEFAULT_SYSTEM_PROMPT, mask_prompt=True,
                            max_seq_length=96, name="train")
    mx.random.seed(7)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 8.0, "dropout": 0.0})
    args = TrainingArgs(batch_size=2, iters=3, steps_per_report=100, steps_per_save=100, max_seq_length=96,
                        adapter_file=str(tmp_path / "mlx_lm_adapters.safetensors"))
    saved = json.loads((ours / "adapter_config.json").read_text(encoding="utf-8"))
    opt_kwargs = (saved.get("optimizer_config") or {}).get("adam") or {}
    opt = optim.Adam(learning_rate=saved["learning_rate"], **opt_kwargs)
    train(model, opt, TokenDataset(exs, 2, seed=7), None, args,
          loss=masked_loss, iterate_batches=iterate_batches)
    a = mx.load(str(ours / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "mlx_lm_adapters.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-6), k


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_no_mask_prompt_is_recorded_and_valid_is_optional(smoke_model_dir, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", tiny_records(4))
    adapter = tmp_path / "a"
    assert cli(*fast_flags(smoke_model_dir, data, adapter, iters=2, no_mask_prompt=True)) == 0
    meta = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))["fishtune"]
    assert meta["mask_prompt"] is False
    assert not (adapter / "metrics.jsonl").read_text(encoding="utf-8").count('"kind": "val"')  # no valid.jsonl
