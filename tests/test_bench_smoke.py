"""The bench scripts still run (no timing asserts: benchmarks report, they never assert).

Runs the quickest bench entry point - our generation on the tiny smoke model,
2 tokens, one repeat - into a temporary results folder, then renders the
markdown table from it into a temporary README.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_generate_and_table_run(smoke_model_dir, tmp_path):
    env = dict(os.environ, FISHTUNE_BENCH_RESULTS=str(tmp_path / "results"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "bench/bench_generate.py", "--only", "ours", "--model", str(smoke_model_dir),
         "--max-tokens", "2", "--repeats", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "results" / "generate.json").read_text(encoding="utf-8"))
    ours = doc["summary"]["ours"]
    assert ours["generated_tokens"] >= 1 and ours["peak_rss_mb"] > 0
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["versions"]["mlx"]
    assert "gen_worker.py ours" in ours["command"]

    readme = tmp_path / "README.md"
    proc = subprocess.run(
        [sys.executable, "bench/make_table.py", "--results", str(tmp_path / "results"), "--readme", str(readme)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = readme.read_text(encoding="utf-8")
    assert "### Generation" in text and "| fishtune (`fishtune.infer.generation`" in text
    assert "not measured yet" in text  # the other benches have no results in the temp folder
