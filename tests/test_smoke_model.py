"""The offline smoke model loads identically in MLX-LM and transformers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fishtune  # noqa: F401  (OpenBLAS before mlx)
from fishtune.errors import UserError, run_cli
from fishtune.smoke_model import (
    ROPE_THETA,
    SIZES,
    STAMP_FILE,
    build_smoke_model,
    ensure_smoke_model,
    is_current,
    main,
    smoke_config,
)

REPO = Path(__file__).resolve().parent.parent
PROMPT = "### Instruction:\n孔雀鱼多久换一次水？\n\n### Response:\n一般每周换水一次<|endoftext|>"


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def mlx_loaded(smoke_model_dir):
    import mlx_lm

    return mlx_lm.load(str(smoke_model_dir))


@pytest.fixture(scope="module")
def hf_loaded(smoke_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smoke_model_dir), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(smoke_model_dir))


def test_mlx_and_transformers_logits_agree(mlx_loaded, hf_loaded):
    import mlx.core as mx
    import torch

    mlx_model, mlx_tok = mlx_loaded
    hf_model, hf_tok = hf_loaded
    ids = hf_tok.encode(PROMPT)
    assert mlx_tok.encode(PROMPT) == ids
    assert ids[-1] == 151643
    mlx_logits = np.array(mlx_model(mx.array([ids]))[0].astype(mx.float32))
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([ids])).logits[0].float().numpy()
    assert mlx_logits.shape == hf_logits.shape == (len(ids), 151936)
    assert np.abs(mlx_logits - hf_logits).max() < 1e-4
    # The random model is not degenerate: positions differ and logits spread.
    assert hf_logits.std() > 0.05
    assert np.abs(hf_logits[-1] - hf_logits[-2]).max() > 0.1


def test_rope_theta_honoured(smoke_model_dir, mlx_loaded, hf_loaded):
    cfg = json.loads((smoke_model_dir / "config.json").read_text(encoding="utf-8"))
    # 10000.0 differs from MLX-LM's qwen2 default (1e6), so a reader that
    # ignored the config would fail here.
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == ROPE_THETA == 10000.0
    mlx_model, _ = mlx_loaded
    assert mlx_model.args.rope_theta == ROPE_THETA
    assert mlx_model.model.layers[0].self_attn.rope.base == ROPE_THETA
    hf_model, _ = hf_loaded
    assert hf_model.config.rope_parameters["rope_theta"] == ROPE_THETA


def test_tied_embeddings_and_names(smoke_model_dir, hf_loaded):
    from safetensors import safe_open

    with safe_open(str(smoke_model_dir / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        assert f.get_tensor("model.embed_tokens.weight").dtype == np.float32
    assert "lm_head.weight" not in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"} <= names
    for proj in ("q", "k", "v"):
        assert f"model.layers.0.self_attn.{proj}_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert len(names) == 1 + 1 + 2 * 12
    # Non-trivial biases and norms.
    assert np.abs(bias).max() > 0.05
    assert np.abs(norm - 1).max() > 0.05
    hf_model, _ = hf_loaded
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_config_and_generation_config(smoke_model_dir):
    cfg = json.loads((smoke_model_dir / "config.json").read_text(encoding="utf-8"))
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"] is True
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 151643
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    gen = json.loads((smoke_model_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert gen["eos_token_id"] == 151643
    tok_cfg = json.loads((smoke_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_cfg["eos_token"] == "<|endoftext|>"


def test_k256_rows_are_multiples_of_256(smoke_model_k256_dir):
    from safetensors import safe_open

    cfg = smoke_config("k256")
    assert cfg["hidden_size"] % 256 == 0 and cfg["intermediate_size"] % 256 == 0
    with safe_open(str(smoke_model_k256_dir / "model.safetensors"), framework="numpy") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if len(shape) == 2:  # llama.cpp quantizes along the row (input) dimension
                assert shape[1] % 256 == 0, (name, shape)


def test_deterministic_build(tmp_path):
    a = build_smoke_model(tmp_path / "a", "tiny", seed=0)
    b = build_smoke_model(tmp_path / "b", "tiny", seed=0)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = build_smoke_model(tmp_path / "c", "tiny", seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_ensure_rebuilds_only_when_stale(tmp_path):
    out = tmp_path / "m"
    ensure_smoke_model(out, "tiny")
    assert is_current(out, "tiny")
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    ensure_smoke_model(out, "tiny")
    assert weights.stat().st_mtime_ns == mtime  # up to date: untouched
    stamp = json.loads((out / STAMP_FILE).read_text())
    (out / STAMP_FILE).write_text(json.dumps({**stamp, "builder_version": -1}))
    assert not is_current(out, "tiny")
    ensure_smoke_model(out, "tiny")
    assert is_current(out, "tiny")
    assert not any(p.name.startswith(".m.") for p in tmp_path.iterdir() if p.is_dir())  # no temp folders left


def test_unknown_size(tmp_path):
    with pytest.raises(UserError, match=r"smoke model size 'huge' is unknown; use one of: tiny, k256"):
        ensure_smoke_model(tmp_path / "x", "huge")
    assert set(SIZES) == {"tiny", "k256"}


def test_cli(tmp_path, smoke_model_dir, capsys):
    # Up to date: nothing to do.
    assert run_cli(main)(["--output", str(smoke_model_dir), "--size", "tiny"]) == 0
    # Someone else's folder is not overwritten without --force.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert run_cli(main)(["--output", str(other), "--size", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not an up-to-date tiny smoke model" in err and "--force" in err
    assert (other / "keep.txt").exists()
    assert run_cli(main)(["--output", str(other), "--size", "tiny", "--seed", "3", "--force"]) == 0
    assert is_current(other, "tiny", seed=3) and not (other / "keep.txt").exists()


def test_cli_help_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "fishtune.smoke_model", "--help"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0
    assert "--output" in r.stdout and "--size" in r.stdout and "k256" in r.stdout
