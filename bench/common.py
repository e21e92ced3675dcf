"""Shared helpers for the benchmarks: machine facts, measured subprocesses, results.

Benchmarks report, they never assert. Each bench script writes one JSON file
to ``bench/results/`` with the machine, the versions, the exact commands it ran
and its numbers; ``bench/make_table.py`` turns those files into the tables in
``bench/README.md``.

Peak RSS of a subprocess is taken from ``os.wait4`` (the kernel's
``ru_maxrss`` of exactly that child and the descendants it waited for), so no
polling thread can miss a short spike.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# FISHTUNE_BENCH_RESULTS: where result JSON goes (the smoke test points it at a temp dir).
RESULTS = Path(os.environ.get("FISHTUNE_BENCH_RESULTS") or BENCH / "results")
WORK = BENCH / "work"  # git-ignored: models, data, adapters, GGUFs
PY = sys.executable

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------
# Environment for child processes
# ---------------------------------------------------------------------------
def child_env(openblas: bool = True, **extra: str) -> dict[str, str]:
    """Environment for a measured child: offline, repo on sys.path.

    ``openblas=False`` sets ``FISHTUNE_NO_OPENBLAS=1``; a child that never
    imports fishtune (raw ``python -m mlx_lm``) gets MLX's bundled BLAS anyway.
    """
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not openblas:
        env["FISHTUNE_NO_OPENBLAS"] = "1"
    env.update(extra)
    return env


# ---------------------------------------------------------------------------
# Measured subprocesses
# ---------------------------------------------------------------------------
@dataclass
class Proc:
    cmd: list[str]
    rc: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    @property
    def command(self) -> str:
        return shlex.join(_rel(c) for c in self.cmd)

    def check(self) -> "Proc":
        if self.rc != 0:
            tail = (self.stderr or self.stdout)[-3000:]
            raise RuntimeError(f"command failed (rc {self.rc}): {self.command}\n{tail}")
        return self


def _rel(arg: str) -> str:
    """Commands are recorded relative to the repo root (what a reader types)."""
    s = str(arg)
    if s == PY:
        return "venv/bin/python" if "venv" in s else "python"
    return s.replace(str(ROOT) + os.sep, "")


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 3600,
                 cwd: Path | None = None) -> Proc:
    """Run ``cmd``; return its exit code, wall time, peak RSS (MB) and output."""
    import tempfile

    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env or child_env(), cwd=str(cwd or ROOT))
        deadline = t0 + timeout
        rusage = None
        status = 0
        while True:
            pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                _, status, rusage = os.wait4(p.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        out.seek(0)
        err.seek(0)
        return Proc(cmd, p.returncode, wall, rusage.ru_maxrss / 1024.0, out.read(), err.read())


class RssSampler:
    """Peak RSS of a running process tree (for long-lived servers), by polling."""

    def __init__(self, pid: int, interval: float = 0.05):
        import threading

        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._t.join(timeout=2)
        return self.peak / 2**20


def self_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------
def median(xs: Iterable[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def alternate(names: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """Run order A B C A B C ...: slow drifts (other load, thermals) hit every contender alike."""
    return [(r, n) for r in range(repeats) for n in names]


# ---------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    return []


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def numpy_blas() -> str:
    try:
        import numpy as np

        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # old numpy without mode="dicts"
        return "unknown"


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("mlx", "mlx-lm", "numpy", "torch", "transformers", "peft", "llama_cpp_python", "gguf", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine_info() -> dict[str, Any]:
    from fishtune.blas import find_openblas, loaded_blas

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gib": mem_total_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "blas": {
            "numpy": numpy_blas(),
            "mlx_ours": loaded_blas() or find_openblas() or "MLX bundled reference BLAS (no OpenBLAS found)",
            "mlx_raw": "MLX bundled BLAS (raw `python -m mlx_lm`, no preload)",
        },
        "versions": versions(),
    }


# ---------------------------------------------------------------------------
# Matmul peak (the machine's limit the training FLOP/s are compared with)
# ---------------------------------------------------------------------------
def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peaks(n: int = 1024, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of one n x n x n matmul (best of ``repeats``) in each library and dtype.

    Runs in a child process so MLX can be imported with OpenBLAS preloaded
    (and separately without it) regardless of what this process imported.
    """
    code = r"""
import json, os, sys, time
want_openblas = sys.argv[1] == "1"
if want_openblas:
    import fishtune  # preloads OpenBLAS before mlx
import numpy as np, mlx.core as mx
n, reps = int(sys.argv[2]), int(sys.argv[3])
def best(fn):
    fn(); b = 1e9
    for _ in range(reps):
        t = time.perf_counter(); fn(); b = min(b, time.perf_counter() - t)
    return b
fl = 2 * n ** 3 / 1e9
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
out = {}
tag = "mlx_openblas" if want_openblas else "mlx_bundled"
for name, dt in (("float32", mx.float32), ("bfloat16", mx.bfloat16)):
    x = mx.array(a).astype(dt)
    out[f"{tag}_{name}"] = fl / best(lambda: mx.eval(x @ x))
if want_openblas:
    out["numpy_float32"] = fl / best(lambda: a @ a)
    import torch
    t = torch.from_numpy(a)
    out["torch_float32"] = fl / best(lambda: t @ t)
    tb = t.bfloat16()
    out["torch_bfloat16"] = fl / best(lambda: tb @ tb)
print(json.dumps(out))
"""
    res: dict[str, float] = {}
    for flag in ("1", "0"):
        p = run_measured([PY, "-c", code, flag, str(n), str(repeats)], env=child_env(openblas=flag == "1"), timeout=600)
        if p.rc == 0:
            res.update(json.loads(p.stdout.strip().splitlines()[-1]))
    res = {k: round(v, 2) for k, v in res.items()}
    f32 = [v for k, v in res.items() if k.endswith("float32")]
    if f32:
        res["peak_float32"] = max(f32)
    return res


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------
def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def others_cpu(interval: float = 2.0) -> float:
    """Cores kept busy by processes outside this bench's own process tree, sampled over ``interval``.

    The load average also counts the bench's own (previous) processes, so it
    alone can't tell a quiet machine from a busy one."""
    import psutil

    me = psutil.Process()
    mine = {me.pid} | {c.pid for c in me.children(recursive=True)}

    def snap() -> dict[int, float]:
        out = {}
        for p in psutil.process_iter():
            if p.pid in mine:
                continue
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    a = snap()
    time.sleep(interval)
    b = snap()
    return sum(max(0.0, b[k] - a.get(k, b[k])) for k in b) / interval


def load_average() -> tuple[float, float, float, float]:
    """(1, 5, 15-minute load average, cores used by other processes right now)."""
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    return (la[0], la[1], la[2], others_cpu())  # type: ignore[return-value]


def quiet_note(load_before: Sequence[float], load_after: Sequence[float]) -> str:
    cores = os.cpu_count() or 1
    o0 = load_before[3] if len(load_before) > 3 else float("nan")
    o1 = load_after[3] if len(load_after) > 3 else float("nan")
    text = (f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; other processes used "
            f"{o0:.2f} / {o1:.2f} of {cores} cores before / after")
    if max(o0, o1) < 0.25:
        return f"quiet machine ({text})"
    return f"NOT a quiet machine ({text}): other work shared the CPU, timings are noisy"


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>.json (atomic; machine and versions included)."""
    from fishtune.fileio import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"bench": name, "date": now_utc(), "machine": machine_info(), **payload}
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, doc)
    return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]


@dataclass
class Timer:
    laps: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str, t0: float) -> float:
        self.laps[name] = time.perf_counter() - t0
        return self.laps[name]
