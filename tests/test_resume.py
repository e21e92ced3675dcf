"""--resume: a run killed with kill -9 and resumed ends with the uninterrupted run's adapter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from fishtune.errors import UserError
from fishtune.train.checkpoints import latest_checkpoint, list_checkpoints

import mlx.core as mx  # noqa: E402  (after fishtune)

# Dropout on, gradient accumulation over 2 steps and checkpoints every 3 steps,
# so a checkpoint holds a half-accumulated gradient: all must be restored.
YAML = """\
lora_parameters:
  rank: 4
  scale: 8.0
  dropout: 0.2
optimizer: adamw
"""


def _argv(model: Path, data: Path, adapter: Path, cfg: Path, iters: int = 7) -> list[str]:
    return [
        "--model", str(model), "--train", "--data", str(data), "--adapter-path", str(adapter), "-c", str(cfg),
        "--fine-tune-type", "dora", "--batch-size", "2", "--iters", str(iters), "--learning-rate", "1e-2",
        "--max-seq-length", "64", "--grad-accumulation-steps", "2", "--seed", "5", "--save-every", "3",
        "--steps-per-eval", "100", "--steps-per-report", "1", "--num-layers", "2", "--no-progress",
    ]


def _finetune_main():
    from fishtune.train.cli import main

    return main


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_checkpoint_discovery_ignores_temp_and_incomplete_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, files in [("0000003", ["state.json", "adapters.safetensors"]), (".tmp-0000009-123", ["adapters.safetensors"]),
                        ("0000006", ["adapters.safetensors"]), ("junk", ["state.json", "adapters.safetensors"])]:
        (root / name).mkdir(parents=True)
        for f in files:
            (root / name / f).write_text("x")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert latest_checkpoint(tmp_path)[0] == 3


def test_kill_9_then_resume_equals_uninterrupted(smoke_model_dir, tiny_data_dir, tmp_path):
    cfg = tmp_path / "lora_config.yaml"
    cfg.write_text(YAML, encoding="utf-8")
    main = _finetune_main()

    # 1. The uninterrupted reference run.
    ref = tmp_path / "ref"
    assert main(_argv(smoke_model_dir, tiny_data_dir, ref, cfg)) == 0

    # 2. The same run in a subprocess, killed with SIGKILL right after its first checkpoint.
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "finetune.py"), *_argv(smoke_model_dir, tiny_data_dir, run, cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while latest_checkpoint(run) is None:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = latest_checkpoint(run)[0]
    assert killed_at < 7, "the run finished before it could be killed"
    cfg_run = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
    assert cfg_run["fishtune"]["status"] == "training"

    # A half-written checkpoint (temp folder) and an incomplete numbered folder are never resumed from.
    (run / "checkpoints" / ".tmp-0000008-99999").mkdir()
    (run / "checkpoints" / ".tmp-0000008-99999" / "adapters.safetensors").write_bytes(b"garbage")
    (run / "checkpoints" / "0000007").mkdir(exist_ok=True)
    (run / "checkpoints" / "0000007" / "adapters.safetensors").write_bytes(b"garbage")

    # Without --resume or --force an unfinished run is not overwritten.
    with pytest.raises(UserError, match=r"holds an unfinished run \(last checkpoint: step \d+\); pass --resume"):
        main(_argv(smoke_model_dir, tiny_data_dir, run, cfg))
    # Changed settings that alter the trajectory are refused.
    bad = _argv(smoke_model_dir, tiny_data_dir, run, cfg) + ["--resume", "--seed", "6"]
    with pytest.raises(UserError, match=r"can't resume from .*: seed was 5, now 6"):
        main(bad)

    # 3. Resume: ends with the reference adapter.
    assert main(_argv(smoke_model_dir, tiny_data_dir, run, cfg) + ["--resume"]) == 0
    a, b = _weights(ref / "adapters.safetensors"), _weights(run / "adapters.safetensors")
    assert set(a) == set(b)
    moved = _weights(ref / "0000003_adapters.safetensors")
    assert any(not np.allclose(a[k], moved[k]) for k in a)  # training did change the weights after step 3
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)

    # The metrics log is continuous: each step once, no duplicates from the killed run.
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 8))
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    ref_loss = [r["train_loss"] for r in ref_rows if r["kind"] == "train"]
    run_loss = [r["train_loss"] for r in rows if r["kind"] == "train"]
    np.testing.assert_allclose(run_loss, ref_loss, rtol=1e-5)
    meta = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))["fishtune"]
    assert meta["status"] == "finished" and meta["trained_steps"] == 7

    # Finished: resuming again needs a larger --iters.
    with pytest.raises(UserError, match=r"already at step 7 of --iters 7; raise --iters"):
        main(_argv(smoke_model_dir, tiny_data_dir, run, cfg) + ["--resume"])
