"""convert_to_huggingface.py: fused HF folder + PEFT adapter, proven equal to MLX."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fishtune.errors import UserError, run_cli


def _convert(argv: list[str]) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_to_huggingface", REPO / "convert_to_huggingface.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return run_cli(mod.main)(argv)


@pytest.fixture(scope="module")
def adapters(smoke_model_dir, tiny_data_dir, tmp_path_factory):
    from fishtune.training import train_adapter

    root = tmp_path_factory.mktemp("hf_export_adapters")
    out = {}
    for kind in ("dora", "lora"):
        out[kind] = train_adapter(
            str(smoke_model_dir), str(tiny_data_dir), str(root / kind), fine_tune_type=kind, iters=6,
            batch_size=2, max_seq_length=128, learning_rate=5e-3,
        )
    return out


@pytest.mark.parametrize("kind", ["dora", "lora"])
def test_export_is_proven_equal(kind, adapters, tmp_path):
    from fishtune.hf_export import export_huggingface

    out = tmp_path / "hf"
    result = export_huggingface(None, adapters[kind], out)
    assert result.passed, result.checks
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "fishtune.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and "rope_theta" in cfg
    assert result.checks["transformers_fused"]["max_abs_logit_diff"] < 1e-4
    assert result.checks["transformers_peft"]["greedy_identical"]
    peft_cfg = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    train_cfg = json.loads((Path(adapters[kind]) / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA"
    assert peft_cfg["use_dora"] is (kind == "dora")
    lp = train_cfg["lora_parameters"]
    assert peft_cfg["r"] == lp["rank"]
    assert peft_cfg["lora_alpha"] / peft_cfg["r"] == pytest.approx(lp["scale"])
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    from fishtune.adapter_meta import read_project_meta

    assert tok_cfg["chat_template"] == read_project_meta(adapters[kind]).prompt_template.jinja_chat_template()


def test_peft_keys_are_peft_names(adapters, tmp_path):
    from safetensors.numpy import load_file

    from fishtune.hf_export import export_huggingface

    out = tmp_path / "hf"
    export_huggingface(None, adapters["dora"], out, verify=False)
    keys = load_file(str(out / "peft_adapter" / "adapter_model.safetensors")).keys()
    assert any(k.endswith(".lora_A.weight") for k in keys)
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)


def test_quantized_base_is_dequantized_and_fused(smoke_model_k256_dir, tiny_data_dir, tmp_path):
    from mlx_lm.convert import convert

    from fishtune.hf_export import export_huggingface
    from fishtune.training import train_adapter

    qdir = tmp_path / "q4"
    convert(str(smoke_model_k256_dir), mlx_path=str(qdir), quantize=True, q_bits=4, q_group_size=64)
    adapter = train_adapter(
        str(qdir), str(tiny_data_dir), str(tmp_path / "qlora"), fine_tune_type="lora", iters=4,
        batch_size=2, max_seq_length=128, learning_rate=5e-3,
    )
    out = tmp_path / "hf"
    result = export_huggingface(None, adapter, out)
    assert result.passed, result.checks
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float32"


def test_output_exists_needs_force(adapters, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_text("finished work")
    with pytest.raises(UserError, match="already exists; pass --force"):
        from fishtune.hf_export import export_huggingface

        export_huggingface(None, adapters["lora"], out)
    assert (out / "model.safetensors").read_text() == "finished work"


def test_adapter_on_another_base_names_the_tensor(adapters, smoke_model_k256_dir, tmp_path):
    with pytest.raises(UserError, match=r"shape"):
        from fishtune.hf_export import export_huggingface

        export_huggingface(str(smoke_model_k256_dir), adapters["lora"], tmp_path / "hf")


def test_unknown_architecture_is_named(adapters, smoke_model_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(smoke_model_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"] = "falcon_mamba"
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="falcon_mamba"):
        from fishtune.hf_export import export_huggingface

        export_huggingface(str(base), adapters["lora"], tmp_path / "hf")


def test_script_exit_codes(adapters, tmp_path):
    assert _convert(["--adapter-path", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 2
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert_to_huggingface.py"), "--adapter-path", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr
