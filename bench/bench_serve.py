"""Serving: 1, 4 and 16 concurrent clients against server.py on loopback.

server.py serves the bench model (MLX back end, no adapter) on 127.0.0.1 at a
free port; each concurrency level sends a bounded number of OpenAI-style
``POST /v1/chat/completions`` requests (greedy, fixed max_tokens) from that
many client threads, each request bounded by a timeout and the level by a
deadline. Reported per level: requests/s, generated tokens/s (the server's
``usage.completion_tokens``), p50/p95 latency, errors. The server's peak RSS
is sampled with psutil.

    python bench/bench_serve.py [--quick]
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

from common import (PY, ROOT, WORK, RssSampler, _rel, child_env, load_average, log, quiet_note, write_result)
from fixtures import build_model

QUESTIONS = ["金鱼身上出现白点怎么办？", "新鱼缸需要养水多久？", "锦鲤烂鳃病如何治疗？", "鱼缸的水为什么发绿？"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> tuple[int, dict | None]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except Exception:  # timeout, reset: counted as an error
        return -1, None


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server.py exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/api/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError("server.py did not become ready")


def run_level(url: str, clients: int, n_requests: int, max_tokens: int, deadline_s: float, req_timeout: float) -> dict:
    lock = threading.Lock()
    todo = list(range(n_requests))
    lat: list[float] = []
    toks = 0
    errors: dict[str, int] = {}
    t_end = time.perf_counter() + deadline_s

    def client() -> None:
        nonlocal toks
        while True:
            with lock:
                if not todo or time.perf_counter() > t_end:
                    return
                i = todo.pop()
            body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            status, resp = post(url, body, req_timeout)
            dt = time.perf_counter() - t0
            with lock:
                if status == 200 and resp:
                    lat.append(dt)
                    toks += int(resp.get("usage", {}).get("completion_tokens", 0))
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return lat[min(len(lat) - 1, max(0, int(round(p * (len(lat) - 1)))))]

    res = {"clients": clients, "requests": n_requests, "completed": len(lat), "errors": sum(errors.values()),
           "errors_by_status": errors, "wall_s": wall, "requests_per_s": len(lat) / wall,
           "generated_tokens": toks, "gen_tokens_per_s": toks / wall, "latency_p50_s": pct(0.5),
           "latency_p95_s": pct(0.95), "latency_mean_s": statistics.mean(lat) if lat else None,
           "not_sent": n_requests - len(lat) - sum(errors.values())}
    log(f"{clients:>2} clients: {res['requests_per_s']:.2f} req/s, {res['gen_tokens_per_s']:.1f} tok/s, "
        f"p50 {res['latency_p50_s'] or 0:.2f} s, p95 {res['latency_p95_s'] or 0:.2f} s, errors {res['errors']}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--levels", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--requests-per-client", type=int)
    ap.add_argument("--deadline", type=float, help="seconds per level (requests not sent by then are dropped)")
    a = ap.parse_args(argv)
    max_tokens = a.max_tokens or (16 if a.quick else 64)
    per_client = a.requests_per_client or (1 if a.quick else 2)
    deadline = a.deadline or (120.0 if a.quick else 300.0)

    load0 = load_average()
    model = build_model(WORK / "bench-model", "bench")
    port = free_port()
    cmd = [PY, str(ROOT / "server.py"), "--model", str(model), "--no-adapter", "--host", "127.0.0.1",
           "--port", str(port), "--threads", "32"]
    log("starting " + " ".join(_rel(c) for c in cmd))
    errf = open(WORK / "server.log", "w")
    proc = subprocess.Popen(cmd, env=child_env(), cwd=str(ROOT), stdout=errf, stderr=subprocess.STDOUT)
    sampler = None
    levels = []
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        wait_ready(base, proc)
        ready_s = time.perf_counter() - t0
        sampler = RssSampler(proc.pid)
        url = base + "/v1/chat/completions"
        run_level(url, 1, 1, 4, 60, 120)  # warm-up (compilation, first allocation); not reported
        for c in a.levels:
            n = max(c * per_client, 4)
            levels.append(run_level(url, c, n, max_tokens, deadline, req_timeout=deadline))
    finally:
        peak = sampler.stop() if sampler else None
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errf.close()
    path = write_result("serve", {
        "quick": a.quick,
        "settings": {"max_tokens": max_tokens, "requests_per_level": {str(x["clients"]): x["requests"] for x in levels},
                     "deadline_s_per_level": deadline, "endpoint": "POST /v1/chat/completions (non-streaming)",
                     "sampling": "greedy", "backend": "MLX (server.py default), bench model, no adapter"},
        "server_command": " ".join(_rel(c) for c in cmd).replace(str(port), "<port>"),
        "server_ready_s": ready_s,
        "server_peak_rss_mb": peak,
        "levels": levels,
        "load_note": quiet_note(load0, load_average()),
        "command": "python bench/bench_serve.py" + (" --quick" if a.quick else ""),
    })
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
