"""The seed guide's raw `python3 -m mlx_lm lora ... -c lora_config.yaml` honours our YAML.

Runs the seed's command with its exact flag set (only values changed for
speed: the smoke model, the tiny data, 4 iterations of batch 1) against the
shipped lora_config.yaml, then proves from the run's adapter_config.json and
adapters.safetensors that every setting of the YAML was used, and that
fishtune.train.config resolves the same file + flags to the same MLX-LM args.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fishtune.project import read_project_meta
from fishtune.train.config import MLX_DEFAULTS, load_config
from fishtune.template import DEFAULT_SYSTEM_PROMPT

REPO = Path(__file__).resolve().parent.parent

# Verbatim from the seed guide (section 4.1).
SEED_COMMAND = (
    "python3 -m mlx_lm lora --model Qwen/Qwen2-1.5B --train --data ./data --fine-tune-type dora "
    "--batch-size 4 --iters 40 --learning-rate 1e-4 --max-seq-length 1024 --grad-accumulation-steps 2 "
    "--seed 42 --save-every 100 --adapter-path ./lora_qwen2_1.5b --test --steps-per-eval 50 "
    "--steps-per-report 10 -c lora_config.yaml"
)


def seed_argv(**values: str) -> list[str]:
    """The seed's mlx_lm arguments with some flag values replaced (same flag set)."""
    argv = shlex.split(SEED_COMMAND)[3:]  # drop `python3 -m mlx_lm`
    assert argv[0] == "lora"
    for flag, value in values.items():
        opt = "-c" if flag == "c" else "--" + flag.replace("_", "-")
        i = argv.index(opt)  # only flags the seed already passes
        argv[i + 1] = value
    return argv


def argv_to_overrides(argv: list[str]) -> dict:
    """The same flags as finetune.py's overrides (MLX-LM snake_case names)."""
    out: dict = {}
    i = 1
    while i < len(argv):
        flag = argv[i]
        if flag == "-c":
            i += 2
            continue
        key = flag[2:].replace("-", "_")
        if key in ("train", "test"):
            out[key] = True
            i += 1
            continue
        raw = argv[i + 1]
        default = MLX_DEFAULTS[key]
        out[key] = float(raw) if isinstance(default, float) else int(raw) if isinstance(default, int) and not isinstance(default, bool) else raw
        i += 2
    return out


@pytest.fixture(scope="module")
def seed_run(smoke_model_dir, tiny_data_dir, tmp_path_factory):
    adapter_dir = tmp_path_factory.mktemp("seed_run") / "lora_qwen2_1.5b"
    argv = seed_argv(
        model=str(smoke_model_dir),
        data=str(tiny_data_dir),
        batch_size="1",
        iters="4",  # 4 iterations / 2 accumulation = 2 optimizer updates
        max_seq_length="128",
        adapter_path=str(adapter_dir),
        steps_per_eval="2",
        steps_per_report="2",
        c=str(REPO / "lora_config.yaml"),  # the shipped file: num_layers -1 fits the 2-layer smoke model
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # `python -m mlx_lm ...`, with fishtune imported first for OpenBLAS.
    code = "import fishtune, runpy, sys; sys.argv = ['mlx_lm'] + sys.argv[1:]; runpy.run_module('mlx_lm', run_name='__main__')"
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return argv, adapter_dir, proc.stdout + proc.stderr


def test_seed_command_honours_every_yaml_setting(seed_run, smoke_model_dir):
    argv, adapter_dir, log = seed_run
    assert "Loading configuration file" in log and "Test loss" in log
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    # from the YAML (the seed passes none of these on the command line)
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 2.0, "dropout": 0.05}  # alpha 16 / rank 8
    assert cfg["num_layers"] == -1
    assert cfg["optimizer"] == "adamw"
    assert cfg["optimizer_config"]["adamw"] == {"weight_decay": 0.0001, "bias_correction": True}
    assert cfg["lr_schedule"] == {"name": "cosine_decay", "warmup": 2, "warmup_init": 1e-5, "arguments": [1e-4, 16, 1e-5]}
    assert cfg["grad_checkpoint"] is True
    assert cfg["mask_prompt"] is False
    # from the command line (wins over the YAML)
    assert cfg["fine_tune_type"] == "dora" and cfg["model"] == str(smoke_model_dir)
    assert (cfg["batch_size"], cfg["iters"], cfg["grad_accumulation_steps"], cfg["seed"]) == (1, 4, 2, 42)
    assert cfg["learning_rate"] == 1e-4 and cfg["max_seq_length"] == 128
    # MLX-LM carried the project section along unread
    assert cfg["fishtune"] == {"template": "alpaca", "system_prompt": DEFAULT_SYSTEM_PROMPT, "mask_prompt": True,
                               "lr_schedule_lengths": "derived"}
    meta = read_project_meta(adapter_dir)
    assert (meta.template, meta.system_prompt, meta.base_model) == ("alpaca", DEFAULT_SYSTEM_PROMPT, str(smoke_model_dir))


def test_seed_run_weights_match_rank_layers_and_dora(seed_run):
    import mlx.core as mx

    _, adapter_dir, _ = seed_run
    weights = mx.load(str(adapter_dir / "adapters.safetensors"))
    lora_a = {k: v for k, v in weights.items() if k.endswith("lora_a")}
    assert lora_a and all(v.shape[1] == 8 for v in lora_a.values())  # rank 8
    layers = {k.split(".")[2] for k in lora_a}
    assert layers == {"0", "1"}  # num_layers -1 = both blocks of the smoke model
    assert any(k.endswith(".m") for k in weights)  # DoRA magnitude vectors
    # every Linear of a block (no `keys` in the YAML): q/k/v/o and the MLP
    names = {k.split(".")[-2] for k in lora_a}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_seed_run_schedule_warms_up_per_optimizer_update(seed_run):
    """MLX-LM's own schedule builder on the recorded lr_schedule: warmup_init -> peak in 2 updates."""
    from mlx_lm.tuner.utils import build_schedule

    _, adapter_dir, _ = seed_run
    sched = build_schedule(json.loads((adapter_dir / "adapter_config.json").read_text())["lr_schedule"])
    lrs = [sched(step).item() for step in range(5)]
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[1] == pytest.approx(5.5e-5)
    assert lrs[2] == pytest.approx(1e-4) and lrs[3] == pytest.approx(1e-4)  # peak, then cosine starts
    assert lrs[4] < 1e-4


def test_fishtune_resolves_the_same_args_as_raw_mlx_lm(seed_run):
    """load_config(yaml, same flags).to_mlx_dict() == what MLX-LM ran with."""
    argv, adapter_dir, _ = seed_run
    ran = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    # The YAML's schedule lengths as written (raw MLX-LM's reading) ...
    explicit = {**argv_to_overrides(argv), "lr_schedule_lengths": "explicit"}
    ours = load_config(REPO / "lora_config.yaml", explicit).to_mlx_dict()
    for key in MLX_DEFAULTS:
        if key in ("config",) or key.endswith("_feature"):
            continue
        assert ours[key] == ran[key], key
    # ... and the shipped "derived" lengths: the same but for the schedule, re-sized to this run's 2 updates,
    derived = load_config(REPO / "lora_config.yaml", argv_to_overrides(argv)).to_mlx_dict()
    assert {k: v for k, v in derived.items() if k not in ("lr_schedule", "fishtune")} == \
        {k: v for k, v in ours.items() if k not in ("lr_schedule", "fishtune")}
    assert derived["lr_schedule"]["arguments"][1] == 1 and derived["lr_schedule"]["warmup"] == 0
    # while the seed's own 40 iterations get exactly the numbers the YAML writes for raw MLX-LM.
    seed = load_config(REPO / "lora_config.yaml", argv_to_overrides(seed_argv())).resolved_lr_schedule()
    assert seed == yaml.safe_load((REPO / "lora_config.yaml").read_text(encoding="utf-8"))["lr_schedule"]
    assert {k: derived["fishtune"][k] for k in ran["fishtune"]} == ran["fishtune"]
