"""Batched generation in the MLX back end: concurrent requests decode together, each with its own settings.

A real server process (smoke model + DoRA adapter). The unbatched reference
is ``fishtune.infer.generation.generate`` in this process on the same model;
"inside a batch" is made certain, not timed: long streamed answers are
running (the health endpoint counts them in the batch) before the request
is sent, and still running after it returned.
"""
from __future__ import annotations

import json
import socket
import threading

import pytest
import requests
from conftest import (
    LONG_ANSWER,
    check_load,
    health,
    raw_post,
    server_adapter,
    start_mlx_server,
    wait_for,
)

from fishtune.infer.generation import SamplingConfig, generate

QUESTIONS = ["鱼身上有白点还蹭缸怎么办？", "金鱼翻肚子浮在水面是什么原因？", "新买的鱼需要隔离多久？"]
N_TOKENS = 16


@pytest.fixture(scope="module")
def server(smoke_model_dir, tiny_data_dir, tmp_path_factory):
    srv = start_mlx_server(smoke_model_dir, tiny_data_dir, tmp_path_factory.mktemp("batching"), "--max-tokens", "8",
                           "--threads", "24", "--max-batch", "16", "--max-sessions", "100")
    yield srv
    srv.stop()


def ask(url: str, question: str, **sampling) -> str:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": N_TOKENS, **sampling}
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def ask_into(out: dict[int, str], i: int, url: str, question: str, sampling: dict) -> None:
    out[i] = ask(url, question, **sampling)


def ask_all(url: str, questions: list[str], **sampling) -> list[str]:
    """The questions sent at once, one thread each."""
    out: dict[int, str] = {}
    threads = [threading.Thread(target=ask_into, args=(out, i, url, q, sampling)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [out[i] for i in range(len(questions))]


def long_streams(port: int, n: int) -> list[socket.socket]:
    """``n`` long answers, each streaming (its first event arrived), so they run in the batch."""
    body = json.dumps({**LONG_ANSWER, "stream": True}).encode()
    socks = [raw_post(port, "/api/chat", body) for _ in range(n)]
    for s in socks:
        data = b""
        while b"data:" not in data:
            data += s.recv(4096)
    return socks


def test_greedy_alone_equals_the_unbatched_generation(server, smoke_model_dir, tiny_data_dir):
    from fishtune.loading import load_model

    lm = load_model(str(smoke_model_dir), str(server_adapter(smoke_model_dir, tiny_data_dir)))
    for q in QUESTIONS:
        prompt = lm.template.render_prompt([{"role": "user", "content": q}], lm.system_prompt)
        assert ask(server.url, q, temperature=0) == generate(lm, prompt, SamplingConfig(temperature=0,
                                                                                         max_tokens=N_TOKENS)).text


def test_inside_a_batch_each_request_keeps_its_own_greedy_or_seeded_answer(server):
    alone_greedy = [ask(server.url, q, temperature=0) for q in QUESTIONS]
    alone_seeded = [ask(server.url, q, temperature=0.9, top_p=0.95, top_k=50, seed=7 + i) for i, q in enumerate(QUESTIONS)]
    socks = long_streams(server.port, 3)
    try:
        assert health(server.url)["batch_running"] >= 3
        in_batch_greedy = ask_all(server.url, QUESTIONS, temperature=0)
        assert health(server.url)["batch_running"] >= 3  # the long ones still run: these were decoded with them
        in_batch_seeded = [ask(server.url, q, temperature=0.9, top_p=0.95, top_k=50, seed=7 + i)
                           for i, q in enumerate(QUESTIONS)]
        assert health(server.url)["batch_running"] >= 3
    finally:
        for s in socks:
            s.close()
    assert in_batch_greedy == alone_greedy
    assert in_batch_seeded == alone_seeded
    wait_for(lambda: health(server.url)["batch_running"] == 0)  # closed streams left the batch
    assert "Traceback" not in server.log()


def test_load_16_concurrent_clients_no_errors_no_cross_talk(server):
    """16 clients x 2 turns at once (loopback, bounded), streamed and not: each history holds only its own turns."""
    check_load(server.url, 16, max_tokens=12)
    h = health(server.url)
    assert h["sessions"] >= 16 and h["batch_max"] == 16 and h["generating"] == 0
    assert "Traceback" not in server.log()


class FailingOnce:
    """The smoke model, except that its first forward pass raises (an MLX error mid-batch)."""

    def __init__(self, model):
        self.model = model
        self.failed = False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("simulated failure inside the forward pass")
        return self.model(*args, **kwargs)


def test_a_failing_step_fails_its_requests_and_the_scheduler_keeps_serving(smoke_model_dir):
    from fishtune.loading import load_model
    from fishtune.serve.batching import BatchJob, BatchScheduler
    from fishtune.serve.errors import BackendError

    lm = load_model(str(smoke_model_dir), None, no_adapter=True)
    ids = lm.tokenizer.encode(lm.template.question_prompt("你好", lm.system_prompt))
    scheduler = BatchScheduler(FailingOnce(lm.model), lm.tokenizer, max_batch=4)
    try:
        job = scheduler.submit(BatchJob(ids, SamplingConfig(temperature=0, max_tokens=4), lm.template.stop_strings))
        with pytest.raises(BackendError, match="generation failed \\(RuntimeError\\); try again"):
            list(job.chunks())
        job = scheduler.submit(BatchJob(ids, SamplingConfig(temperature=0, max_tokens=4), lm.template.stop_strings))
        final = list(job.chunks())[-1]
        assert final.finish_reason in ("stop", "length") and final.generation_tokens >= 1
    finally:
        scheduler.close()
