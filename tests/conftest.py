"""Shared fixtures: the offline smoke model, a tiny data folder, trained adapters.

Everything heavy is built once per test session and cached under
``tests/artifacts/`` (git-ignored); the smoke model under ``models/``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Keep runs deterministic and light on a 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import fishtune  # noqa: E402  (loads OpenBLAS before any mlx import)

ARTIFACTS = REPO / "tests" / "artifacts"

# A few fish-care records for tests (the real data set is data/fish_care_dataset.json).
TINY_QA = [
    ("孔雀鱼多久换一次水？", "一般每周换水一次，每次换三分之一左右，新水要提前除氯并保持水温一致。"),
    ("鱼身上有白点还蹭缸怎么办？", "这是典型的白点病。把水温缓慢升到28到30度，配合千分之三的盐浴，持续一周以上，并隔离病鱼。"),
    ("金鱼翻肚子浮在水面是什么原因？", "多为鳔病或消化不良。先停食两三天，保持水质稳定，可喂去壳煮熟的豌豆帮助消化。"),
    ("新买的鱼需要隔离多久？", "建议单独隔离观察两周左右，期间观察有无白点、烂鳍、拒食等症状，确认健康后再混养。"),
    ("鱼缸水发白浑浊是怎么回事？", "多是细菌爆发或硝化系统未建立。减少喂食，少量多次换水，加强过滤和增氧，不要频繁洗滤材。"),
    ("斗鱼可以和其他鱼混养吗？", "公斗鱼之间会打斗，不能同缸；可与性格温和、不咬鳍的小型鱼混养，缸内多放水草供其躲避。"),
    ("水霉病有什么症状？", "鱼体表或伤口上长出白色棉絮状菌丝，多发生在低温和受伤后。可用盐浴配合亚甲基蓝药浴，并提高水温。"),
    ("亚硝酸盐超标怎么处理？", "立即换水三分之一，暂停喂食，补充硝化细菌并加强增氧，之后每天检测直到降到零。"),
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def tiny_records(n: int) -> list[dict]:
    """``n`` records in the data stage's output format (text + raw fields)."""
    from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

    tpl = get_template()
    rows = []
    for i in range(n):
        q, a = TINY_QA[i % len(TINY_QA)]
        rows.append(
            {
                "text": tpl.training_text(q, a, DEFAULT_SYSTEM_PROMPT),
                "question": q,
                "answer": a,
                "category": "test",
            }
        )
    return rows


@pytest.fixture(scope="session")
def smoke_model_dir() -> Path:
    """The tiny random Qwen2 (real tokenizer), built once under models/."""
    from fishtune.smoke_model import ensure_smoke_model

    return ensure_smoke_model(REPO / "models" / "smoke-tiny", size="tiny")


@pytest.fixture(scope="session")
def smoke_model_k256_dir() -> Path:
    """The variant whose matrix rows are multiples of 256 (llama.cpp K-quants)."""
    from fishtune.smoke_model import ensure_smoke_model

    return ensure_smoke_model(REPO / "models" / "smoke-k256", size="k256")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train/valid/test.jsonl with a handful of records."""
    d = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(d / "train.jsonl", tiny_records(16))
    write_jsonl(d / "valid.jsonl", tiny_records(4))
    write_jsonl(d / "test.jsonl", tiny_records(4))
    return d


# ---- trained adapters shared by several test files ----------------------------------
_TRAINED: dict[tuple, Path] = {}  # one training run per test session (test_inference/test_chat reuse it)


def train_tiny_adapter(model_dir: Path, data_dir: Path, out: Path, fine_tune_type: str = "dora") -> Path:
    """A real (2-step) MLX-LM training run, then random non-zero adapter weights.

    Callers must not modify the returned folder (copy it first): it is shared.
    """
    from fishtune.train.config import DEFAULT_CONFIG_PATH
    from fishtune.train.trainer import train_adapter

    key = (str(model_dir), str(data_dir), fine_tune_type)
    done = _TRAINED.get(key)
    if done is not None and (done / "adapters.safetensors").is_file():
        return done
    train_adapter(model_dir, data_dir, out, fine_tune_type, iters=2, config=DEFAULT_CONFIG_PATH, num_layers=2)
    randomize_adapter(out)
    _TRAINED[key] = out
    return out


def randomize_adapter(adapter_dir: Path, seed: int = 0) -> None:
    """Training 2 steps barely moves lora_b off zero: make the adapter matter."""
    import mlx.core as mx
    import numpy as np

    path = adapter_dir / "adapters.safetensors"
    weights = mx.load(str(path))
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in sorted(weights.items()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_a", "lora_b"):
            out[name] = mx.array(rng.normal(0, 0.2, w.shape).astype(np.float32)).astype(w.dtype)
        elif leaf == "m":
            out[name] = (w * mx.array(rng.uniform(0.8, 1.2, w.shape).astype(np.float32))).astype(w.dtype)
        else:
            out[name] = w
    mx.save_safetensors(str(path), out)


# ---- a real server process (test_server*.py) ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python server.py ...`` on a free loopback port; waits for /api/health."""

    def __init__(self, args: list[str], log_path: Path, script: str = "server.py", timeout_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / script), *map(str, args), "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{script} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/api/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{script} did not answer /api/health in {timeout_s} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def server_adapter(smoke_model_dir: Path, tiny_data_dir: Path) -> Path:
    """A DoRA adapter for the smoke model, trained once and kept under tests/artifacts."""
    import hashlib

    out = ARTIFACTS / "server-adapter"
    # Keyed on the smoke model's config: a rebuilt, different smoke model gets a new adapter.
    key = hashlib.sha256((Path(smoke_model_dir) / "config.json").read_bytes()).hexdigest()[:16]
    stamp = out / "smoke_model_key.txt"
    if (out / "adapters.safetensors").is_file() and stamp.is_file() and stamp.read_text() == key:
        return out
    tmp = ARTIFACTS / f"server-adapter.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    trained = train_tiny_adapter(smoke_model_dir, tiny_data_dir, tmp)
    if Path(trained) != tmp:  # an adapter trained earlier in this session is shared: copy it
        shutil.copytree(trained, tmp)
    (tmp / "smoke_model_key.txt").write_text(key)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def sse_events(resp: requests.Response) -> list:
    """The ``data:`` payloads of a Server-Sent Events response (``[DONE]`` kept as a string)."""
    out = []
    for line in resp.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
