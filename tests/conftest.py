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


# ---- helpers for the server tests (test_server_*.py) ------------------------------------


def wait_for(check, timeout_s: float = 60.0, interval_s: float = 0.2):
    """Poll ``check()`` until it returns something truthy (returned) or ``timeout_s`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s: {check}")
        time.sleep(interval_s)


def health(url: str) -> dict:
    return requests.get(url + "/api/health", timeout=30).json()


def raw_post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
             timeout_s: float = 60.0) -> socket.socket:
    """A POST written on a plain socket (the caller reads or closes it: a client that may go away)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    head = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
            **(headers or {})}
    sock.sendall(f"POST {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
                 + b"\r\n" + body)
    return sock


# A request whose answer outlasts any test step: on the smoke model with the server adapter, the greedy
# answer to this question repeats one token for all 4000 tokens (no stop string, no end token); a sampled
# answer may end after a few dozen tokens.
LONG_ANSWER = {"message": "讲一个很长很长的故事", "max_tokens": 4000, "temperature": 0}


def start_mlx_server(smoke_model_dir: Path, tiny_data_dir: Path, folder: Path, *args) -> ServerProcess:
    """server.py on the smoke model + the shared DoRA adapter, conversations in ``folder``/data, log in ``folder``."""
    adapter = server_adapter(smoke_model_dir, tiny_data_dir)
    return ServerProcess(["--model", smoke_model_dir, "--adapter-path", adapter, "--data-dir", folder / "data", *args],
                         folder / "server.log")


def turn_messages(questions: list[str], answers: list[str]) -> list[dict]:
    """A history as /api/history shows it: user and assistant messages, turn by turn."""
    out: list[dict] = []
    for q, a in zip(questions, answers):
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def chat_client(url: str, i: int, results: dict, errors: list, max_tokens: int | None) -> None:
    """Client ``i`` of a load test: 2 turns in its own session (streamed and not, alternating), then its history."""
    s = requests.Session()
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    try:
        questions = [f"第{i}号客户的问题{t}：鱼缸{i}号怎么换水？" for t in (1, 2)]
        answers = []
        for q in questions:
            r = s.post(url + "/api/chat", json={"message": q, "stream": (i + len(answers)) % 2 == 0, **extra},
                       timeout=300, stream=True)
            if r.status_code != 200:
                errors.append(f"client {i}: HTTP {r.status_code} {r.text}")
                return
            if r.headers["Content-Type"].startswith("text/event-stream"):
                answers.append("".join(e.get("delta", "") for e in sse_events(r)))
            else:
                answers.append(r.json()["response"])
        hist = s.get(url + "/api/history", timeout=60).json()["messages"]
        results[i] = {"expected": turn_messages(questions, answers), "history": hist}
    except Exception as exc:  # collected and asserted by the caller
        errors.append(f"client {i}: {type(exc).__name__}: {exc}")


def check_load(url: str, n_clients: int, max_tokens: int | None = None) -> None:
    """``n_clients`` x 2 turns at once (loopback, bounded): no errors, each history holds only its own turns."""
    import threading

    results: dict[int, dict] = {}
    errors: list[str] = []
    threads = [threading.Thread(target=chat_client, args=(url, i, results, errors, max_tokens))
               for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert sorted(results) == list(range(n_clients))
    for i, res in results.items():
        assert res["history"] == res["expected"], f"client {i} sees another history"
