"""The defects a probe of the running server found, each reproduced against a real server process.

MLX back end on the smoke model + a DoRA adapter (waitress, Flask, real
generation, SQLite in a temporary --data-dir); the Ollama cases run behind
tests/fake_ollama.py. Numbers in the test names are the issue's defect list.
"""
from __future__ import annotations

import json
import socket

import pytest
import requests
from conftest import (
    LONG_ANSWER,
    REPO,
    ServerProcess,
    health,
    raw_post,
    sse_events,
    start_mlx_server,
    wait_for,
)
from fake_ollama import FakeOllama

from fishtune.infer.chat import ChatSession
from fishtune.template import get_template


@pytest.fixture(scope="module")
def server(smoke_model_dir, tiny_data_dir, tmp_path_factory):
    srv = start_mlx_server(smoke_model_dir, tiny_data_dir, tmp_path_factory.mktemp("defects"), "--max-tokens", "8",
                           "--threads", "8", "--max-sessions", "50")
    yield srv
    srv.stop()


def history(url: str, session_id: str) -> list[dict]:
    return requests.get(url + "/api/history", params={"session_id": session_id}, timeout=30).json()["messages"]


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of a response the server closes after sending (waitress's refusals)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def status_line(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        data += sock.recv(4096)
    return int(data.split(b" ", 2)[1])


# ---- 1. a non-streamed request of a client that went away -------------------------------


def test_1_non_streamed_request_of_a_gone_client_is_cancelled_and_not_saved(server):
    sid = "gone-client-0001"
    sock = raw_post(server.port, "/api/chat", json.dumps({**LONG_ANSWER, "session_id": sid}).encode())
    wait_for(lambda: health(server.url)["busy"])
    sock.close()  # like `timeout 2 curl ...`
    wait_for(lambda: not health(server.url)["busy"])
    assert "client disconnected; stopping generation" in server.log()
    assert history(server.url, sid) == []  # the answer nobody received is not kept
    r = requests.post(server.url + "/api/chat", json={"message": "还在吗？", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


# ---- 2. the history cap -------------------------------------------------------------------


def test_2_chat_session_prompt_keeps_the_newest_max_turns():
    chat = ChatSession(get_template(), "sys", max_turns=20, max_context_tokens=100_000)
    for i in range(15):
        chat.add_turn(f"q{i}", "a")
    chat.prompt_for("next")
    assert chat.last_dropped == 0 and [q for q, _ in chat.turns] == [f"q{i}" for i in range(15)]
    for i in range(15, 25):
        chat.add_turn(f"q{i}", "a")
    chat.prompt_for("next")
    assert [q for q, _ in chat.turns] == [f"q{i}" for i in range(5, 25)]


def test_2_a_session_keeps_all_its_turns_up_to_max_turns(server):
    sid = "fifteen-turns-01"
    for i in range(1, 16):
        r = requests.post(server.url + "/api/chat", json={"message": f"第{i}轮", "session_id": sid, "max_tokens": 2},
                          timeout=60)
        assert r.status_code == 200, r.text
    users = [m["content"] for m in history(server.url, sid) if m["role"] == "user"]
    assert users == [f"第{i}轮" for i in range(1, 16)]


# ---- 3. sessions only for valid requests ------------------------------------------------


def test_3_requests_that_fail_validation_create_no_session(server):
    real = "real-user-000001"
    assert requests.post(server.url + "/api/chat", json={"message": "我的问题", "session_id": real, "max_tokens": 2},
                         timeout=60).status_code == 200
    before = health(server.url)
    for i in range(60):  # more than --max-sessions 50
        body = {"message": "坏\ud800字", "session_id": f"junk-session-{i:04d}"}  # a lone surrogate
        r = requests.post(server.url + "/api/chat", json=body, timeout=30)
        assert r.status_code == 400 and "is not valid UTF-8 text" in r.json()["error"]
    after = health(server.url)
    assert after["sessions"] == before["sessions"] and after["evicted"] == before["evicted"]
    assert [m["content"] for m in history(server.url, real)][:1] == ["我的问题"]


# ---- 4. the body limit, enforced by the server itself ---------------------------------------


@pytest.mark.parametrize("length", [100 * 2**20, 2 * 2**30])  # under and over waitress's own 1 GiB default
def test_4_a_body_over_the_limit_is_refused_in_json_before_it_is_sent(server, length):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode() + b'{"message": "')  # the rest is never sent
        status, body = read_response(sock)
    assert status == 413
    assert json.loads(body) == {"error": "request body is over the limit of 65536 bytes; send a shorter message"}


# ---- 5. a prompt budget for the OpenAI endpoint --------------------------------------------


def test_5_openai_messages_over_the_prompt_budget_are_a_400(server):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "鱼缸要多久换一次水？"} for i in range(301)]
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "over this server's prompt budget of 2048 tokens (--max-context-tokens)" in err["message"]
    assert err["type"] == "invalid_request_error"


# ---- 6. cheap endpoints don't wait for generation ----------------------------------------


def test_6_cheap_endpoints_answer_while_every_generation_slot_is_taken(smoke_model_dir, tiny_data_dir, tmp_path):
    srv = start_mlx_server(smoke_model_dir, tiny_data_dir, tmp_path, "--threads", "4")  # 4 threads: 2 may generate
    socks = []
    try:
        body = json.dumps({**LONG_ANSWER, "stream": True}).encode()
        socks = [raw_post(srv.port, "/api/chat", body) for _ in range(4)]
        assert sorted(status_line(s) for s in socks) == [200, 200, 503, 503]  # the extra ones at once
        h = requests.get(srv.url + "/api/health", timeout=60).json()
        assert h["generating"] == 2 == h["max_generating"]
        assert requests.get(srv.url + "/", timeout=60).status_code == 200
        assert requests.get(srv.url + "/api/history", timeout=60).status_code == 200
        assert requests.post(srv.url + "/api/clear", timeout=60).json() == {"status": "success"}
        r = requests.post(srv.url + "/api/chat", json={"message": "hi"}, timeout=60)
        assert r.status_code == 503 and "server busy" in r.json()["error"]
    finally:
        for s in socks:
            s.close()
        try:
            wait_for(lambda: health(srv.url)["generating"] == 0)
            assert "Traceback" not in srv.log()
        finally:
            srv.stop()


# ---- 7. no 500s for values MLX or Python refuse ---------------------------------------------


HUGE = b"9" * 5000  # more digits than Python's int() parses


@pytest.mark.parametrize("path,body,needle", [
    ("/api/chat", {"message": "hi", "top_k": 151936}, "top_k=151936 is not below the vocabulary size of 151936"),
    ("/api/chat", {"message": "hi", "top_k": 200000, "stream": True}, "top_k=200000 is not below"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": 151936}, "top_k=151936"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": 151936, "stream": True},
     "top_k=151936"),
    ("/api/chat", b'{"message": "hi", "max_tokens": ' + HUGE + b"}", 'field "max_tokens" is an integer with 5000 digits'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -' + HUGE + b"}",
     'field "max_tokens" is an integer with 5000 digits'),
])
def test_7_values_the_model_or_python_refuse_are_a_named_400(server, path, body, needle):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in (err["message"] if path.startswith("/v1/") else err)
    assert "Traceback" not in server.log() and "internal error" not in r.text


# ---- 8. no state change from another origin -----------------------------------------------


def test_8_state_changes_from_another_origin_are_refused(server):
    sid = "csrf-victim-0001"
    assert requests.post(server.url + "/api/chat", json={"message": "留着", "session_id": sid, "max_tokens": 2},
                         timeout=60).status_code == 200
    other = f"http://127.0.0.1:{server.port + 1}"  # a page on another port of the same host
    attacks = [
        ("/api/clear?session_id=" + sid, {"headers": {"Origin": other}}),  # the probe's: empty body, id in the URL
        ("/api/clear", {"json": {"session_id": sid}, "headers": {"Origin": other}}),
        ("/api/clear", {"json": {"session_id": sid}, "headers": {"Referer": other + "/evil.html"}}),
        ("/api/clear", {"json": {"session_id": sid}, "headers": {"Origin": "null"}}),
        ("/api/chat", {"json": {"message": "冒充", "session_id": sid}, "headers": {"Origin": other}}),
        ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}]},
                                  "headers": {"Origin": other}}),
    ]
    for path, kwargs in attacks:
        r = requests.post(server.url + path, timeout=30, **kwargs)
        assert r.status_code == 403, (path, r.text)
    r = requests.post(server.url + "/api/clear?session_id=" + sid, timeout=30)  # no Origin, but the id in the URL
    assert r.status_code == 400 and "not accepted on POST; send it in the JSON body" in r.json()["error"]
    assert [m["content"] for m in history(server.url, sid)][:1] == ["留着"]
    # the page itself (same origin) and clients that are not browsers still can
    r = requests.post(server.url + "/api/clear", json={"session_id": sid}, headers={"Origin": server.url}, timeout=30)
    assert r.json() == {"status": "success"} and history(server.url, sid) == []


# ---- 9. the Host allowlist, no paths in /api/health ----------------------------------------


def test_9_a_forged_host_is_refused_and_nothing_reflects_it(server):
    for path in ("/", "/api/health", "//api//health", "/static/app.js", "/nothing"):
        r = requests.get(server.url + path, headers={"Host": "evil.example:5001"}, allow_redirects=False, timeout=30)
        assert r.status_code == 403 and "Location" not in r.headers, (path, r.headers)
        assert "evil.example" not in r.headers.get("Set-Cookie", "") and "--allow-host NAME" in r.json()["error"]
    for host in ("localhost", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "LOCALHOST:1"):
        assert requests.get(server.url + "/api/health", headers={"Host": host}, timeout=30).status_code == 200
    h = health(server.url)
    assert h["model"] == "smoke-tiny" and h["adapter"] == "server-adapter" and h["store"] == "server.sqlite3"
    assert str(REPO) not in json.dumps(h) and "/tmp" not in json.dumps(h)


def test_9_more_host_names_with_allow_host_and_stream_errors_in_each_shape(tmp_path):
    with FakeOllama(failing=("broken-model",)) as fake:
        srv = ServerProcess(["--ollama", "broken-model", "--ollama-url", fake.url, "--no-persist",
                             "--allow-host", "fish.lan"], tmp_path / "server.log")
        try:
            assert requests.get(srv.url + "/api/health", headers={"Host": "fish.lan:8080"}, timeout=30).ok
            assert requests.get(srv.url + "/", headers={"Host": "other.lan"}, timeout=30).status_code == 403
            # 11: an error after the stream started is in each format's own shape
            events = sse_events(requests.post(srv.url + "/v1/chat/completions", stream=True, timeout=30, json={
                "messages": [{"role": "user", "content": "你好"}], "stream": True}))
            assert events[-1] == "[DONE]"
            err = events[-2]["error"]
            assert "fake failure" in err["message"] and err["type"] == "server_error" and set(err) == {
                "message", "type", "param", "code"}
            s = requests.Session()
            seed = sse_events(s.post(srv.url + "/api/chat", json={"message": "你好", "stream": True}, stream=True,
                                     timeout=30))
            assert "fake failure" in seed[-1]["error"]
            assert s.get(srv.url + "/api/history", timeout=30).json()["messages"] == []  # a failed turn isn't kept
        finally:
            srv.stop()


# ---- 10. the session-id rule is a full match ---------------------------------------------


def test_10_a_session_id_with_a_trailing_newline_is_refused(server):
    r = requests.post(server.url + "/api/chat", json={"message": "hi", "session_id": "abcdefgh\n"}, timeout=30)
    assert r.status_code == 400 and "is invalid; use 8-64 characters" in r.json()["error"]


# ---- 11. OpenAI compatibility ----------------------------------------------------------------


def openai_text(events: list) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in events if c != "[DONE]" and c["choices"])


def test_11_openai_model_stop_usage_and_unsupported_fields(server):
    url = server.url + "/v1/chat/completions"
    base = {"messages": [{"role": "user", "content": "新鱼要隔离吗？"}], "temperature": 0, "max_tokens": 12}
    r = requests.post(url, json={**base, "model": "gpt-4o"}, timeout=60)
    assert r.status_code == 404
    assert r.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error", "param": "model",
                                                   "code": "model_not_found"}
    assert "gpt-4o" in r.json()["error"]["message"] and "smoke-tiny" in r.json()["error"]["message"]
    for name in ("smoke-tiny", "fish-care"):  # its own name and the alias of the README's examples
        assert requests.post(url, json={**base, "model": name}, timeout=60).status_code == 200
    full = requests.post(url, json=base, timeout=60).json()["choices"][0]["message"]["content"]
    # stop: a piece of the greedy answer; the answer is cut right before it, as the stream is
    k, stop = next((k, full[k:k + 2]) for k in range(1, len(full) - 2)
                   if full[k:k + 2].strip() == full[k:k + 2] and full.find(full[k:k + 2]) == k)
    cut = requests.post(url, json={**base, "stop": stop}, timeout=60).json()["choices"][0]
    assert cut["message"]["content"] == full[:k].rstrip() and cut["finish_reason"] == "stop"
    events = sse_events(requests.post(url, json={**base, "stop": [stop], "stream": True,
                                                 "stream_options": {"include_usage": True}}, stream=True, timeout=60))
    assert events[-1] == "[DONE]" and openai_text(events) == full[:k].rstrip()
    *chunks, last = events[:-1]
    assert all(c["usage"] is None for c in chunks) and last["choices"] == []
    assert last["usage"]["completion_tokens"] >= 1 and last["usage"]["prompt_tokens"] > 10
    refused = [("tools", [{"type": "function", "function": {"name": "f"}}]), ("response_format", {"type": "json_object"}),
               ("logprobs", True), ("presence_penalty", 0.5), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""])]
    for field, value in refused:
        r = requests.post(url, json={**base, field: value}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    r = requests.post(url, json={**base, "stream_options": {"include_usage": True}}, timeout=30)
    assert r.status_code == 400 and '"stream": true' in r.json()["error"]["message"]
