"""fishtune.loading: the one loader (base + adapter, fused in memory) and its errors.

Real MLX-LM on the tiny smoke model, with an adapter trained in the test
(fishtune.training.train_adapter) whose weights are then set to random
non-zero values, so the adapter visibly changes the model's outputs.
"""
from __future__ import annotations

import hashlib
import json
import re
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import train_tiny_adapter
from fishtune.errors import UserError

import mlx.core as mx  # noqa: E402  (after fishtune: OpenBLAS first)




@pytest.fixture(scope="module")
def dora_adapter(smoke_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    return train_tiny_adapter(smoke_model_dir, tiny_data_dir, tmp_path_factory.mktemp("loading") / "dora")


def _logits(lm, text: str) -> np.ndarray:
    ids = mx.array([lm.tokenizer.encode(text)])
    out = lm.model(ids).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(adapter: Path, dst: Path) -> Path:
    shutil.copytree(adapter, dst)
    return dst


def test_fused_and_unfused_logits_agree(smoke_model_dir, dora_adapter):
    from fishtune.loading import load_model

    before = _sha(dora_adapter / "adapters.safetensors")
    unfused = load_model(str(smoke_model_dir), str(dora_adapter), fuse=False)
    fused = load_model(str(smoke_model_dir), str(dora_adapter))
    base = load_model(str(smoke_model_dir), None)
    assert fused.fused and not unfused.fused and not base.fused
    assert any(hasattr(m, "fuse") for _, m in unfused.model.named_modules())
    assert not any(hasattr(m, "fuse") for _, m in fused.model.named_modules())

    text = fused.template.question_prompt("鱼身上有白点怎么办？", fused.system_prompt)
    lf, lu, lb = _logits(fused, text), _logits(unfused, text), _logits(base, text)
    np.testing.assert_allclose(lf, lu, atol=1e-4, rtol=1e-4)
    assert np.abs(lf - lb).max() > 1e-2  # the adapter really changes the model
    assert _sha(dora_adapter / "adapters.safetensors") == before  # files untouched


def test_meta_comes_from_the_adapter(smoke_model_dir, dora_adapter):
    from fishtune.loading import load_model
    from fishtune.template import DEFAULT_SYSTEM_PROMPT

    lm = load_model(None, str(dora_adapter))  # model=None -> the recorded base model
    assert Path(lm.model_path).resolve() == Path(smoke_model_dir).resolve()
    assert lm.template.name == "alpaca" and lm.meta.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert lm.adapter_path == str(dora_adapter) and lm.fine_tune_type == "dora"
    assert "adapter" in lm.describe()
    # The template's end token stops generation as a token too.
    assert lm.tokenizer.convert_tokens_to_ids("<|endoftext|>") in lm.tokenizer.eos_token_ids


def test_other_base_warns_and_names_the_tensor(smoke_model_k256_dir, dora_adapter, caplog):
    from fishtune.loading import load_model

    with caplog.at_level(logging.WARNING, logger="fishtune.loading"):
        with pytest.raises(UserError, match=r"trained on another base model \(recorded: .*smoke-tiny; loaded: "
                                            r".*smoke-k256\): model\.layers\.\d+\..*"
                                            r"adapter shape \(\d+, \d+\) does not match model parameter shape"):
            load_model(str(smoke_model_k256_dir), str(dora_adapter))
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warn and str(smoke_model_k256_dir) in warn[0] and "smoke-tiny" in warn[0]


def test_shape_mismatch_in_the_file(smoke_model_dir, dora_adapter, tmp_path):
    from fishtune.loading import load_model

    bad = _copy(dora_adapter, tmp_path / "bad")
    w = dict(mx.load(str(bad / "adapters.safetensors")))
    name = sorted(k for k in w if k.endswith("lora_a"))[0]
    w[name] = mx.zeros((w[name].shape[0] + 3, w[name].shape[1]))
    mx.save_safetensors(str(bad / "adapters.safetensors"), w)
    with pytest.raises(UserError, match=re.escape(name) + r": adapter shape \(\d+, \d+\) does not match"):
        load_model(str(smoke_model_dir), str(bad))


def test_adapter_folder_errors(smoke_model_dir, dora_adapter, tmp_path):
    from fishtune.loading import load_model

    with pytest.raises(UserError, match="adapter folder .*nope does not exist"):
        load_model(str(smoke_model_dir), str(tmp_path / "nope"))

    broken = _copy(dora_adapter, tmp_path / "badjson")
    (broken / "adapter_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="adapter_config.json is not valid JSON"):
        load_model(str(smoke_model_dir), str(broken))

    noweights = _copy(dora_adapter, tmp_path / "noweights")
    (noweights / "adapters.safetensors").unlink()
    with pytest.raises(UserError, match="adapters.safetensors is missing"):
        load_model(str(smoke_model_dir), str(noweights))

    garbage = _copy(dora_adapter, tmp_path / "garbage")
    (garbage / "adapters.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="adapters.safetensors can't be read .*corrupt"):
        load_model(str(smoke_model_dir), str(garbage))

    tpl = _copy(dora_adapter, tmp_path / "tpl")
    cfg = json.loads((tpl / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["fishtune"]["template"] = "vicuna"
    (tpl / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(UserError, match="unknown template 'vicuna'; choose one of: alpaca, chatml"):
        load_model(str(smoke_model_dir), str(tpl))


def test_model_not_found_offline():
    from fishtune.loading import load_model

    with pytest.raises(UserError, match=r"model 'fishtune-test/no-such-model' is not available offline.*"
                                        r"hub can't be reached.*models/smoke-tiny"):
        load_model("fishtune-test/no-such-model", None)


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    from fishtune.loading import load_model

    # Absolute, ./relative or deeper paths can't be hub ids: say the folder is missing.
    for name in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(UserError, match=f"model folder {re.escape(name)} does not exist; pass --model"):
            load_model(name, None)
    # "org/name" could be either: the message names the folder it looked in too.
    with pytest.raises(UserError, match=r"not available offline \(nor a folder in .*\)"):
        load_model("models/not-built-yet", None)


def test_model_folder_without_config(tmp_path):
    from fishtune.loading import load_model

    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path / "m"), None)





def test_bfloat16_models_compute_in_float32_on_the_cpu(smoke_model_dir, tmp_path, monkeypatch):
    """MLX CPU bf16 matmuls are ~40x slower than float32 (bench/results/train.json)."""
    import shutil

    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_load_model

    from fishtune.loading import load_model

    bf16 = tmp_path / "bf16"
    shutil.copytree(smoke_model_dir, bf16)
    net, _ = mlx_load_model(bf16)
    net.set_dtype(mx.bfloat16)
    mx.save_safetensors(str(bf16 / "model.safetensors"), dict(tree_flatten(net.parameters())), metadata={"format": "mlx"})
    dtypes = {v.dtype for _, v in tree_flatten(load_model(str(bf16), None).model.parameters())}
    assert dtypes == {mx.float32}
    monkeypatch.setenv("FISHTUNE_KEEP_DTYPE", "1")
    dtypes = {v.dtype for _, v in tree_flatten(load_model(str(bf16), None).model.parameters())}
    assert dtypes == {mx.bfloat16}
