"""Serving: 1, 4 and 16 concurrent clients against server.py and against mlx_lm.server, same model, same requests.

Both servers run the bench model (MLX, float32, OpenBLAS: mlx_lm.server
through bench/mlx_lm_server_openblas.py, which imports fishtune first) on a
free 127.0.0.1 port, one after the other. Every request is a streamed
OpenAI ``POST /v1/chat/completions`` (greedy, fixed max_tokens, stop "###",
``stream_options.include_usage``) with the same system message and a
question made unique per request (no prompt-cache hits on either side);
mlx_lm.server gets our template as its ``--chat-template``, so both see the
same prompt tokens (``mean_prompt_tokens`` shows it). Each concurrency level
sends a bounded number of requests from that many client threads, each
request bounded by a timeout and the level by a deadline.

Reported per level: aggregate generated tokens/s (``usage.completion_tokens``
over the level's wall time), requests/s, TTFT (first content) and latency
(to ``[DONE]``) p50/p95, errors. ``ratios``: ``clients16_vs_1`` (ours at 16
clients over ours at 1) and ``ours_vs_mlx_lm_server_16``.

    python bench/bench_serve.py [--quick] [--only ours|mlx_lm]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import (
    PY,
    ROOT,
    WORK,
    RssSampler,
    _rel,
    child_env,
    load_average,
    log,
    quiet_note,
    write_result,
)
from fixtures import build_model

from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

QUESTIONS = ["金鱼身上出现白点怎么办？", "新鱼缸需要养水多久？", "锦鲤烂鳃病如何治疗？", "鱼缸的水为什么发绿？"]
SERVERS = ("ours", "mlx_lm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, model: Path, port: int) -> list[str]:
    if name == "ours":
        return [PY, str(ROOT / "server.py"), "--model", str(model), "--no-adapter", "--host", "127.0.0.1",
                "--port", str(port), "--threads", "32", "--max-batch", "16", "--no-persist"]
    return [PY, str(ROOT / "bench" / "mlx_lm_server_openblas.py"), "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--chat-template", get_template().jinja_chat_template(), "--log-level", "WARNING"]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def blas_of(pid: int) -> str:
    """Which BLAS the server process has mapped (from /proc/PID/maps)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    libs = sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower() and "/" in line})
    return libs[0] if libs else "no OpenBLAS mapped (bundled BLAS)"


def request_body(i: int, max_tokens: int) -> dict:
    # No "model": each server's own (mlx_lm.server would try to load a hub model of that name).
    return {"temperature": 0, "max_tokens": max_tokens, "stop": ["###"], "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                         {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]}（第{i}位用户）"}]}


def stream_request(url: str, body: dict, timeout: float) -> dict:
    """One streamed completion: status, TTFT, latency, token counts (from the usage chunk)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    out = {"status": -1, "ttft_s": None, "latency_s": None, "completion_tokens": 0, "prompt_tokens": 0}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out["status"] = r.status
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    out["completion_tokens"] = int(chunk["usage"].get("completion_tokens", 0))
                    out["prompt_tokens"] = int(chunk["usage"].get("prompt_tokens", 0))
                content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                if content and out["ttft_s"] is None:
                    out["ttft_s"] = time.perf_counter() - t0
        out["latency_s"] = time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        out["status"] = e.code
    except Exception:  # timeout, reset: counted as an error
        out["status"] = -1
    return out


def pct(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p * (len(xs) - 1)))))] if xs else None


def run_level(url: str, clients: int, n_requests: int, max_tokens: int, deadline_s: float, first: int) -> dict:
    lock = threading.Lock()
    todo = list(range(first, first + n_requests))
    done: list[dict] = []
    errors: dict[str, int] = {}
    t_end = time.perf_counter() + deadline_s

    def client() -> None:
        while True:
            with lock:
                if not todo or time.perf_counter() > t_end:
                    return
                i = todo.pop()
            res = stream_request(url, request_body(i, max_tokens), timeout=deadline_s)
            with lock:
                if res["status"] == 200 and res["latency_s"] is not None and res["completion_tokens"] > 0:
                    done.append(res)
                else:
                    errors[str(res["status"])] = errors.get(str(res["status"]), 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [d["latency_s"] for d in done]
    ttft = [d["ttft_s"] for d in done if d["ttft_s"] is not None]
    toks = sum(d["completion_tokens"] for d in done)
    res = {"clients": clients, "requests": n_requests, "completed": len(done), "errors": sum(errors.values()),
           "errors_by_status": errors, "wall_s": wall, "requests_per_s": len(done) / wall,
           "generated_tokens": toks, "gen_tokens_per_s": toks / wall,
           "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
           "latency_mean_s": statistics.mean(lat) if lat else None,
           "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
           "mean_prompt_tokens": statistics.mean(d["prompt_tokens"] for d in done) if done else None,
           "not_sent": n_requests - len(done) - sum(errors.values())}
    log(f"{clients:>2} clients: {res['gen_tokens_per_s']:.1f} tok/s, {res['requests_per_s']:.2f} req/s, "
        f"TTFT p50 {res['ttft_p50_s'] or 0:.2f} s, latency p50 {res['latency_p50_s'] or 0:.2f} s "
        f"p95 {res['latency_p95_s'] or 0:.2f} s, errors {res['errors']}")
    return res


def bench_server(name: str, model: Path, levels: list[int], per_client: int, max_tokens: int,
                 deadline: float) -> dict:
    """Start one server, warm it up, run every level, stop it."""
    port = free_port()
    cmd = server_command(name, model, port)
    shown = " ".join(_rel(c) if not c.startswith("{%") else "'<the alpaca Jinja template>'" for c in cmd)
    log(f"starting {name}: {shown}")
    logf = open(WORK / f"serve-{name}.log", "w")
    proc = subprocess.Popen(cmd, env=child_env(), cwd=str(ROOT), stdout=logf, stderr=subprocess.STDOUT)
    sampler = None
    out: dict = {"command": shown.replace(str(port), "<port>"), "levels": []}
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        wait_ready(base + ("/api/health" if name == "ours" else "/health"), proc)
        out["ready_s"] = time.perf_counter() - t0
        out["blas"] = blas_of(proc.pid)
        sampler = RssSampler(proc.pid)
        url = base + "/v1/chat/completions"
        run_level(url, 4, 4, 4, 120, first=10_000)  # warm-up (first allocations, batch shapes); not reported
        first = 0
        for c in levels:
            n = max(c * per_client, 4)
            out["levels"].append(run_level(url, c, n, max_tokens, deadline, first))
            first += n
    finally:
        out["peak_rss_mb"] = sampler.stop() if sampler else None
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()
    return out


def level_tps(run: dict | None, clients: int) -> float | None:
    lv = next((x for x in (run or {}).get("levels", []) if x["clients"] == clients), None)
    return lv["gen_tokens_per_s"] if lv and lv["completed"] else None


def ratios(ours: dict | None, theirs: dict | None) -> dict[str, float | None]:
    o1, o16, t16 = level_tps(ours, 1), level_tps(ours, 16), level_tps(theirs, 16)
    return {"clients16_vs_1": o16 / o1 if o1 and o16 else None,
            "ours_vs_mlx_lm_server_16": o16 / t16 if o16 and t16 else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter answers (32 tokens), about 2 minutes in all")
    ap.add_argument("--levels", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--only", choices=SERVERS, default=None, help="bench one server only")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--requests-per-client", type=int)
    ap.add_argument("--deadline", type=float, help="seconds per level (requests not sent by then are dropped)")
    a = ap.parse_args(argv)
    max_tokens = a.max_tokens or (32 if a.quick else 64)
    per_client = a.requests_per_client or 2  # 16 requests at 16 clients were too few for a stable number
    deadline = a.deadline or (120.0 if a.quick else 300.0)

    load0 = load_average()
    model = build_model(WORK / "bench-model", "bench")
    runs = {name: bench_server(name, model, a.levels, per_client, max_tokens, deadline)
            for name in SERVERS if a.only in (None, name)}
    ours, theirs = runs.get("ours"), runs.get("mlx_lm")
    result = ratios(ours, theirs)
    log(f"ratios: {result}")
    path = write_result("serve", {
        "quick": a.quick,
        "settings": {"max_tokens": max_tokens,
                     "requests_per_level": {str(c): max(c * per_client, 4) for c in a.levels},
                     "deadline_s_per_level": deadline,
                     "endpoint": "POST /v1/chat/completions (streamed, include_usage; unique questions)",
                     "sampling": "greedy, stop ###", "backend": "MLX, bench model (float32, OpenBLAS), no adapter"},
        "server_command": (ours or {}).get("command"),
        "server_ready_s": (ours or {}).get("ready_s"),
        "server_peak_rss_mb": (ours or {}).get("peak_rss_mb"),
        "server_blas": (ours or {}).get("blas"),
        "levels": (ours or {}).get("levels", []),
        "mlx_lm_server": theirs,
        "ratios": result,
        "load_note": quiet_note(load0, load_average()),
        "command": "python bench/bench_serve.py" + (" --quick" if a.quick else ""),
    })
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
