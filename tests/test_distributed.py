"""Data-parallel training under mlx.launch (ring backend, 2 processes on localhost).

Two ranks, each computing its half of every global batch, end with the same
adapter as one process on the whole batch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_records, write_jsonl
from fishtune.errors import run_cli

import mlx.core as mx  # noqa: E402  (after fishtune)

MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"


def _free_port_block(n: int = 4) -> int:
    """A port p with p..p+n-1 free right now (the ring backend uses one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n >= 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for p in range(port, port + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            for s in socks:
                s.close()
            return port
        except OSError:
            for s in socks:
                s.close()
    pytest.skip("no free port block for the ring backend")


def _argv(model: Path, data: Path, adapter: Path, cfg: Path) -> list[str]:
    # SGD: the update is linear in the gradient, so float-rounding differences
    # between 1 and 2 processes stay at rounding level (Adam's first steps
    # normalise near-zero gradients to +-lr and would amplify them).
    return [
        "--model", str(model), "--train", "--data", str(data), "--adapter-path", str(adapter), "-c", str(cfg),
        "--fine-tune-type", "dora", "--batch-size", "4", "--iters", "3", "--learning-rate", "5e-2",
        "--max-seq-length", "96", "--seed", "11", "--save-every", "2", "--steps-per-eval", "3",
        "--steps-per-report", "1", "--num-layers", "2", "--optimizer", "sgd", "--val-batches", "1", "--no-progress",
    ]


@pytest.mark.skipif(not MLX_LAUNCH.exists(), reason="mlx.launch not installed")
def test_two_ranks_equal_one_process(smoke_model_dir, tmp_path):
    # Records of different lengths, so the two ranks see different token counts.
    rows = tiny_records(12)
    for i, r in enumerate(rows):
        r["answer"] = r["answer"][: 6 + 4 * i]
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "valid.jsonl", tiny_records(4))
    cfg = tmp_path / "lora_config.yaml"
    cfg.write_text("lora_parameters: {rank: 4, scale: 8.0, dropout: 0.0}\n", encoding="utf-8")

    from fishtune.train import cli as finetune

    single = tmp_path / "single"
    assert run_cli(finetune.main)(_argv(smoke_model_dir, data, single, cfg)) == 0

    multi = tmp_path / "multi"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [str(MLX_LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_block()),
           "--env", "HF_HUB_OFFLINE=1",
           sys.executable, str(REPO / "finetune.py"), *_argv(smoke_model_dir, data, multi, cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    # Both ranks on one host share its cores (no BLAS oversubscription).
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"OpenBLAS threads per rank: {threads} (2 rank(s) on this host" in out.stdout + out.stderr

    a = {k: np.array(v) for k, v in mx.load(str(single / "adapters.safetensors")).items()}
    b = {k: np.array(v) for k, v in mx.load(str(multi / "adapters.safetensors")).items()}
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)

    cfg_multi = json.loads((multi / "adapter_config.json").read_text(encoding="utf-8"))["fishtune"]
    assert cfg_multi["world_size"] == 2 and cfg_multi["status"] == "finished"
    rows_s = [json.loads(x) for x in (single / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    rows_m = [json.loads(x) for x in (multi / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    # Rank 0 alone wrote: one row per step, and the same global losses.
    assert [r["step"] for r in rows_m if r["kind"] == "train"] == [1, 2, 3]
    for key, kind in (("train_loss", "train"), ("val_loss", "val")):
        np.testing.assert_allclose([r[key] for r in rows_m if r["kind"] == kind],
                                   [r[key] for r in rows_s if r["kind"] == kind], rtol=1e-5)
    # Same token counts overall (each rank counted its share).
    assert [r["trained_tokens"] for r in rows_m if r["kind"] == "train"] == [
        r["trained_tokens"] for r in rows_s if r["kind"] == "train"]
