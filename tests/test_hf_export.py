"""convert_to_huggingface.py: fused HF folder + PEFT adapter, proven equal to MLX."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fishtune.errors import UserError, run_cli
from fishtune.export import hf_cli


def _convert(argv: list[str]) -> int:
    return run_cli(hf_cli.main)(argv)


def _parser():
    return hf_cli.build_parser()


@pytest.fixture(scope="module")
def adapters(smoke_model_dir, tiny_data_dir, tmp_path_factory):
    """A DoRA and a LoRA adapter: real 2-step MLX-LM training, then random non-zero weights so the
    adapter visibly changes the model (a wrong transpose or scale can't hide). Shared with the other
    test modules of the session (read only)."""
    from conftest import train_tiny_adapter

    root = tmp_path_factory.mktemp("hf_export_adapters")
    return {kind: train_tiny_adapter(smoke_model_dir, tiny_data_dir, root / kind, kind) for kind in ("dora", "lora")}


@pytest.fixture(scope="module")
def exports(adapters, tmp_path_factory):
    """The float32 export (with the proof) of each adapter, shared by the tests that inspect it."""
    from fishtune.export.hf import export_huggingface

    root = tmp_path_factory.mktemp("hf_exports")
    return {kind: (root / kind, export_huggingface(None, adapters[kind], root / kind)) for kind in adapters}


@pytest.mark.parametrize("kind", ["dora", "lora"])
def test_export_is_proven_equal(kind, adapters, exports, smoke_model_dir):
    out, result = exports[kind]
    assert result.passed, result.checks
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "fishtune.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors.index.json").exists()  # small: one file
    from safetensors.numpy import load_file

    fused_w = load_file(str(out / "model.safetensors"))
    base_w = load_file(str(smoke_model_dir / "model.safetensors"))
    diff = max(float(abs(fused_w[k] - base_w[k]).max()) for k in base_w if "proj" in k)
    assert diff > 1e-2, diff  # the adapter matters, so the logit proof below means something
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and "rope_theta" in cfg
    assert cfg["torch_dtype"] == "float32" and result.dtype == "float32"
    assert result.checks["transformers_fused"]["max_abs_logit_diff"] < 1e-4
    assert result.checks["transformers_fused"]["greedy_identical"]
    assert result.checks["transformers_peft"]["max_abs_logit_diff"] < 1e-4
    assert result.checks["transformers_peft"]["greedy_identical"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert 151643 in gen["eos_token_id"]  # <|endoftext|>, the alpaca template's end token
    peft_cfg = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    train_cfg = json.loads((Path(adapters[kind]) / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA"
    assert peft_cfg["use_dora"] is (kind == "dora")
    lp = train_cfg["lora_parameters"]
    assert peft_cfg["r"] == lp["rank"]
    assert peft_cfg["lora_alpha"] / peft_cfg["r"] == pytest.approx(lp["scale"])
    assert peft_cfg["lora_dropout"] == pytest.approx(lp.get("dropout", 0.0))
    assert peft_cfg["target_modules"] and peft_cfg["layers_to_transform"]
    assert peft_cfg["base_model_name_or_path"]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    from fishtune.project import read_project_meta

    assert tok_cfg["chat_template"] == read_project_meta(adapters[kind]).prompt_template.jinja_chat_template()


def test_peft_keys_are_peft_names(exports):
    from safetensors.numpy import load_file

    out, _ = exports["dora"]
    keys = load_file(str(out / "peft_adapter" / "adapter_model.safetensors")).keys()
    assert any(k.endswith(".lora_A.weight") for k in keys)
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sharded_export_states_its_tolerance(dtype, adapters, tmp_path, capsys):
    """--dtype bfloat16/float16 with a tiny --max-shard-size: sharded, loads in transformers, looser stated bound."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from fishtune.export.hf import TOLERANCE

    out = tmp_path / "hf"
    # 0.01 GiB: the 39 MB tied embedding is a shard of its own, the rest another
    assert _convert(["--adapter-path", str(adapters["lora"]), "--output-dir", str(out), "--dtype", dtype,
                     "--max-shard-size", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "transformers_fused: max |logit diff|" in printed and f"(tolerance {TOLERANCE[dtype]:g})" in printed
    assert "transformers_peft:" in printed and "PASS" in printed and "FAIL" not in printed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16" if dtype == "bfloat16" else "F16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == getattr(torch, dtype)
    # the tolerance is stated in --help as well
    help_text = " ".join(_parser().format_help().split())
    assert all(f"{TOLERANCE[d]:g}" in help_text for d in TOLERANCE)


def test_quantized_base_is_dequantized_and_fused(smoke_model_dir, tiny_data_dir, tmp_path):
    from mlx_lm.convert import convert

    from fishtune.export.hf import export_huggingface
    from conftest import randomize_adapter
    from fishtune.train.config import DEFAULT_CONFIG_PATH
    from fishtune.train.trainer import train_adapter

    qdir = tmp_path / "q4"
    # the tiny model's rows (64, 128) are multiples of the group size: cheap to quantize and train
    convert(str(smoke_model_dir), mlx_path=str(qdir), quantize=True, q_bits=4, q_group_size=64)
    adapter = train_adapter(
        str(qdir), str(tiny_data_dir), str(tmp_path / "qlora"), fine_tune_type="dora", iters=2,
        config=DEFAULT_CONFIG_PATH, batch_size=2, max_seq_length=128, val_batches=1,
    )
    randomize_adapter(adapter)  # make the adapter matter (2 steps barely move it)
    out = tmp_path / "hf"
    result = export_huggingface(None, adapter, out)
    assert result.passed, result.checks
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float32"
    assert result.checks["transformers_fused"]["max_abs_logit_diff"] < 1e-4


def test_non_finite_weights_are_refused(adapters, tmp_path):
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from fishtune.export.hf import export_huggingface

    bad = tmp_path / "bad"
    shutil.copytree(adapters["lora"], bad)
    w = load_file(str(bad / "adapters.safetensors"))
    name = sorted(k for k in w if k.endswith("lora_b"))[0]
    w[name] = w[name].copy()
    w[name][0, 0] = np.nan
    save_file(w, str(bad / "adapters.safetensors"))
    with pytest.raises(UserError, match=r"fused weight .* non-finite values"):
        export_huggingface(None, bad, tmp_path / "hf", verify=False)
    assert not (tmp_path / "hf").exists()


def test_output_exists_needs_force(adapters, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_text("finished work")
    with pytest.raises(UserError, match="already exists; pass --force"):
        from fishtune.export.hf import export_huggingface

        export_huggingface(None, adapters["lora"], out)
    assert (out / "model.safetensors").read_text() == "finished work"


def test_adapter_on_another_base_names_the_tensor(adapters, smoke_model_k256_dir, tmp_path):
    with pytest.raises(UserError, match=r"trained on another base model .*lora_[ab]: adapter shape \(.*\) does not match model parameter shape"):
        from fishtune.export.hf import export_huggingface

        export_huggingface(str(smoke_model_k256_dir), adapters["lora"], tmp_path / "hf")


def test_unknown_architecture_is_named(adapters, smoke_model_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(smoke_model_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"] = "falcon_mamba"
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="falcon_mamba"):
        from fishtune.export.hf import export_huggingface

        export_huggingface(str(base), adapters["lora"], tmp_path / "hf")


def test_script_exit_codes(adapters, tmp_path):
    assert _convert(["--adapter-path", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 2
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert_to_huggingface.py"), "--adapter-path", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr


def test_failed_proof_exits_1_with_the_numbers(adapters, tmp_path, monkeypatch, capsys):
    """Fault injection: a fused weight flipped after fusing is caught; exit 1, numbers printed."""
    from fishtune.export import hf as hf_export

    real = hf_export._check_finite

    def flip_one(weights):
        real(weights)
        weights["model.layers.1.mlp.down_proj.weight"] = -weights["model.layers.1.mlp.down_proj.weight"]

    monkeypatch.setattr(hf_export, "_check_finite", flip_one)
    assert _convert(["--adapter-path", str(adapters["lora"]), "--output-dir", str(tmp_path / "hf")]) == 1
    cap = capsys.readouterr()
    assert re.search(r"transformers_fused: max \|logit diff\| [0-9.e+-]+ \(tolerance 0\.0001\), greedy 32 tokens "
                     r"(identical|differ): FAIL", cap.out), cap.out
    assert re.search(r"transformers_peft: .*: PASS", cap.out)  # the PEFT adapter is still right


def test_dry_run_checks_and_writes_nothing(adapters, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _convert(["--adapter-path", str(adapters["dora"]), "--output-dir", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "(dora, template alpaca" in printed and "(Qwen2ForCausalLM)" in printed
    assert "peft_adapter/" in printed and "tolerance 0.0001" in printed
    assert not out.exists()
