"""server.py with the MLX back end: a real server process on a free loopback port, driven over HTTP.

The smoke model (random weights, real Qwen2 tokenizer) + a DoRA adapter trained
in the test; answers are noise but every path is the real one: waitress,
Flask, the session table, MLX generation, SSE streaming.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import REPO, check_load, free_port, sse_events, start_mlx_server

from fishtune.errors import UserError
from fishtune.serve.sessions import Conversation, check_session_id
from fishtune.serve.store import SqliteSessionStore


@pytest.fixture(scope="module")
def server(smoke_model_dir, tiny_data_dir, tmp_path_factory):
    srv = start_mlx_server(smoke_model_dir, tiny_data_dir, tmp_path_factory.mktemp("server"), "--max-tokens", "8",
                           "--threads", "12", "--max-sessions", "50")
    yield srv
    srv.stop()


# ---- the seed's API, verbatim ------------------------------------------------------------


def test_seed_curl_examples_verbatim(server):
    """The seed's two curl calls (guide section 6.3), only the port differs."""
    chat_cmd = ["curl", "-s", "-X", "POST", f"{server.url}/api/chat",
                "-H", "Content-Type: application/json", "-d", '{"message":"你好"}']
    clear_cmd = ["curl", "-s", "-X", "POST", f"{server.url}/api/clear"]
    if shutil.which("curl"):
        out = json.loads(subprocess.run(chat_cmd, capture_output=True, check=True, timeout=60).stdout)
        cleared = json.loads(subprocess.run(clear_cmd, capture_output=True, check=True, timeout=60).stdout)
    else:  # the same two requests, byte for byte
        out = requests.post(f"{server.url}/api/chat", data='{"message":"你好"}'.encode(),
                            headers={"Content-Type": "application/json"}, timeout=60).json()
        cleared = requests.post(f"{server.url}/api/clear", timeout=60).json()
    assert set(out) == {"response", "session_id"}
    assert isinstance(out["response"], str)
    check_session_id(out["session_id"])
    assert cleared == {"status": "success"}


def test_health(server):
    h = requests.get(server.url + "/api/health", timeout=10).json()
    assert h["status"] == "ok" and h["backend"] == "mlx"
    assert h["model"].endswith("smoke-tiny") and h["adapter"].endswith("server-adapter")
    assert h["template"] == "alpaca" and h["fused"] is True
    assert isinstance(h["sessions"], int) and h["max_sessions"] == 50


def test_sessions_have_their_own_history_and_clear(server):
    a, b = requests.Session(), requests.Session()
    ra = a.post(server.url + "/api/chat", json={"message": "孔雀鱼多久换一次水？"}, timeout=60).json()
    rb = b.post(server.url + "/api/chat", json={"message": "金鱼翻肚子怎么办？"}, timeout=60).json()
    assert ra["session_id"] != rb["session_id"]
    assert a.cookies.get("fishtune_session") == ra["session_id"]  # the page's cookie
    a.post(server.url + "/api/chat", json={"message": "水温多少合适？"}, timeout=60)
    ha = a.get(server.url + "/api/history", timeout=10).json()
    hb = b.get(server.url + "/api/history", timeout=10).json()
    assert [m["content"] for m in ha["messages"] if m["role"] == "user"] == ["孔雀鱼多久换一次水？", "水温多少合适？"]
    assert [m["content"] for m in hb["messages"] if m["role"] == "user"] == ["金鱼翻肚子怎么办？"]
    assert ha["messages"][1] == {"role": "assistant", "content": ra["response"]}
    # session_id in the body (no cookie) reaches the same history
    via_id = requests.get(server.url + "/api/history", params={"session_id": ra["session_id"]}, timeout=10).json()
    assert via_id["messages"] == ha["messages"]
    # clearing A (by session_id in the JSON body) leaves B alone
    assert requests.post(server.url + "/api/clear", json={"session_id": ra["session_id"]},
                         timeout=10).json() == {"status": "success"}
    assert a.get(server.url + "/api/history", timeout=10).json()["messages"] == []
    assert len(b.get(server.url + "/api/history", timeout=10).json()["messages"]) == 2
    # clearing by cookie
    assert b.post(server.url + "/api/clear", timeout=10).json() == {"status": "success"}
    assert b.get(server.url + "/api/history", timeout=10).json()["messages"] == []


def test_stream_sse(server):
    s = requests.Session()
    r = s.post(server.url + "/api/chat", json={"message": "鱼身上有白点怎么办？", "stream": True,
                                               "max_tokens": 12, "temperature": 0}, stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(r)
    *deltas, done = events
    assert all(set(e) == {"delta"} for e in deltas)
    assert done["done"] is True and done["finish_reason"] in ("stop", "length")
    assert done["session_id"] == s.cookies.get("fishtune_session")
    text = "".join(e["delta"] for e in deltas)
    hist = s.get(server.url + "/api/history", timeout=10).json()["messages"]
    assert hist == [{"role": "user", "content": "鱼身上有白点怎么办？"}, {"role": "assistant", "content": text}]
    # greedy: the same question in a fresh session streams the same answer, and equals the non-streamed one
    again = requests.post(server.url + "/api/chat", json={"message": "鱼身上有白点怎么办？", "max_tokens": 12,
                                                          "temperature": 0}, timeout=60).json()
    assert again["response"] == text


def test_openai_compatible(server):
    body = {"model": "smoke-tiny", "messages": [{"role": "system", "content": "你是鱼病专家。"},
                                              {"role": "user", "content": "新鱼要隔离吗？"}],
            "max_tokens": 6, "temperature": 0}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    choice = r["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    u = r["usage"]
    assert u["prompt_tokens"] > 10 and 1 <= u["completion_tokens"] <= 6
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    events = sse_events(requests.post(server.url + "/v1/chat/completions", json={**body, "stream": True},
                                      stream=True, timeout=60))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == choice["message"]["content"]  # greedy: same text both ways
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "smoke-tiny"


BAD = [
    # (method, path, kwargs, status, error substring)
    ("post", "/api/chat", {"data": "not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("post", "/api/chat", {"data": '{"message": "hi"}', "headers": {"Content-Type": "text/plain"}}, 415,
     "Content-Type must be application/json"),
    ("post", "/api/chat", {"data": b""}, 400, "request body is empty"),
    ("post", "/api/chat", {"json": ["message"]}, 400, "must be a JSON object"),
    ("post", "/api/chat", {"json": {}}, 400, 'field "message" is missing'),
    ("post", "/api/chat", {"json": {"message": "   "}}, 400, 'field "message" is empty'),
    ("post", "/api/chat", {"json": {"message": 42}}, 400, 'field "message" must be a string, got int'),
    ("post", "/api/chat", {"json": {"message": "鱼" * 2001}}, 400, "2001 characters, over the limit of 2000"),
    ("post", "/api/chat", {"json": {"message": "hi", "temperature": -1}}, 400, "temperature=-1 is out of range"),
    ("post", "/api/chat", {"json": {"message": "hi", "top_p": "high"}}, 400, "top_p must be a number"),
    ("post", "/api/chat", {"json": {"message": "hi", "max_tokens": 10**6}}, 400, "over this server's limit of 4096"),
    ("post", "/api/chat", {"json": {"message": "hi", "stream": "yes"}}, 400, 'field "stream" must be true or false'),
    ("post", "/api/chat", {"json": {"message": "hi", "session_id": "../../etc"}}, 400, "session_id '../../etc' is invalid"),
    ("post", "/api/chat", {"data": b'{"message": "' + b"x" * 70000 + b'"}',
                           "headers": {"Content-Type": "application/json"}}, 413, "over the limit of 65536 bytes"),
    # chunked upload (no Content-Length) over the limit
    ("post", "/api/chat", {"data": iter([b'{"message": "', b"x" * 70000, b'"}']),
                           "headers": {"Content-Type": "application/json"}}, 413, "over the limit of 65536 bytes"),
    # small but 30000 levels deep: json.loads would hit Python's recursion limit
    ("post", "/api/chat", {"data": b'{"message": "hi", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}",
                           "headers": {"Content-Type": "application/json"}}, 400, "nested too deeply"),
    ("post", "/api/chat", {"data": b'{"message": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}}, 400,
     "not UTF-8"),
    ("post", "/api/clear", {"data": "x=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415,
     "Content-Type must be application/json"),
    ("get", "/api/chat", {}, 405, "method GET is not allowed on /api/chat; use POST"),
    ("delete", "/api/clear", {}, 405, "use POST"),
    ("get", "/api/nothing", {}, 404, "no such endpoint: GET /api/nothing"),
    ("post", "/v1/embeddings", {"json": {}}, 404, "no such endpoint"),
    ("post", "/v1/chat/completions", {"json": {"messages": []}}, 400, '"messages" must be a non-empty list'),
    ("post", "/v1/chat/completions", {"json": {"messages": [{"role": "tool", "content": "x"}]}}, 400,
     "messages[0].role 'tool' is not one of"),
    ("post", "/v1/chat/completions", {"json": {"messages": [{"role": "assistant", "content": "x"}]}}, 400,
     "expected a user turn"),
    ("post", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}], "n": 2}}, 400,
     "n=2 is not supported"),
]


def test_bad_input_is_4xx_json_and_server_keeps_serving(server):
    for method, path, kwargs, status, needle in BAD:
        r = requests.request(method, server.url + path, timeout=30, **kwargs)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("application/json"), (path, r.headers)
        body = r.json()
        message = body["error"]["message"] if path.startswith("/v1/") else body["error"]  # OpenAI's shape there
        assert set(body) == {"error"} and needle in message, (path, body)
        assert "Traceback" not in r.text
    assert requests.get(server.url + "/api/health", timeout=10).json()["status"] == "ok"
    assert "Traceback" not in server.log()


def test_load_8_concurrent_clients_no_cross_talk(server):
    """8 clients x 2 turns at once (loopback, bounded): no errors, each history holds only its own turns."""
    n_clients = 8
    check_load(server.url, n_clients)
    assert "Traceback" not in server.log()
    h = requests.get(server.url + "/api/health", timeout=10).json()
    assert n_clients <= h["sessions"] <= h["max_sessions"] == 50  # the session table stays bounded


def test_client_disconnect_mid_stream_stops_generation(server):
    """A client that goes away mid-answer cancels its generation; the next request is served."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        body = json.dumps({"message": "讲一个很长的故事", "stream": True, "max_tokens": 4000,
                           "temperature": 1.0}).encode()
        sock.sendall(f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n".encode()
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200 OK" in sock.recv(4096)  # headers (and maybe the first event)
    r = requests.post(server.url + "/api/chat", json={"message": "还在吗？"}, timeout=120)
    assert r.status_code == 200
    deadline = time.monotonic() + 30
    while "client disconnected; stopping generation" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "client disconnected; stopping generation" in server.log()


def test_bad_flags_exit_2(tmp_path, smoke_model_dir):
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "server.py"), *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    r = run("--model", smoke_model_dir, "--adapter-path", tmp_path / "nope", "--port", free_port())
    assert r.returncode == 2 and "error: adapter folder" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("--gguf", tmp_path / "missing.gguf")
    assert r.returncode == 2 and f"GGUF file {tmp_path / 'missing.gguf'} does not exist" in r.stderr
    r = run("--ollama", "m", "--gguf", "x.gguf")
    assert r.returncode == 2 and "--gguf and --ollama" in r.stderr
    r = run("--max-tokens", "0", "--ollama", "m")
    assert r.returncode == 2 and "max_tokens=0 is out of range" in r.stderr


# ---- the session table (in-process) --------------------------------------------------------


def _turn(st: SqliteSessionStore, sid: str, q: str = "q", a: str = "a") -> bool:
    return st.add_turn(st.load(sid), q, a)


def test_session_store_lru_ttl_and_bounds():
    now = [0.0]
    st = SqliteSessionStore(None, max_sessions=3, ttl_s=100, max_turns=2, clock=lambda: now[0])
    for t, sid in enumerate(("aaaaaaaa", "bbbbbbbb", "cccccccc")):
        now[0] = t
        _turn(st, sid)
    now[0] = 3
    _turn(st, "aaaaaaaa")  # a used: b is now least recently used
    now[0] = 4
    _turn(st, "dddddddd")
    assert st.load("bbbbbbbb").turns == () and st.load("aaaaaaaa").turns and len(st) == 3
    assert st.evicted == 1
    now[0] = 50
    _turn(st, "cccccccc")
    now[0] = 120  # a and d idle for > 100 s, c for 70 s
    assert st.load("aaaaaaaa").turns == () and st.load("cccccccc").turns and len(st) == 1
    _turn(st, "eeeeeeee")  # a write expires the idle ones
    assert st.expired == 2
    # histories bounded by max_turns: the newest ones stay, in order
    for i in range(5):
        _turn(st, "ffffffff", f"q{i}", "a" * 10)
    assert [q for q, _ in st.load("ffffffff").turns] == ["q3", "q4"]
    assert st.clear("ffffffff") and st.load("ffffffff").turns == () and not st.clear("zzzzzzzz")


def test_session_store_thread_safe():
    st = SqliteSessionStore(None, max_sessions=20, ttl_s=1000)

    def work(k: int) -> None:
        for i in range(150):
            _turn(st, f"session-{(k * 7 + i) % 40:04d}")
            st.load(f"session-{i % 40:04d}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(st) == 20


def test_session_store_keeps_no_answer_written_across_a_clear():
    st = SqliteSessionStore(None)
    _turn(st, "aaaaaaaa", "q1")
    before = st.load("aaaaaaaa")  # a turn starts from this conversation ...
    assert st.clear("aaaaaaaa")  # ... the user clears it meanwhile
    assert not st.add_turn(before, "q2", "a2") and st.load("aaaaaaaa").turns == ()
    assert st.add_turn(st.load("aaaaaaaa"), "q3", "a3") and st.load("aaaaaaaa").turns == (("q3", "a3"),)
    assert Conversation("x", (("q", "a"),)).messages() == [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("bad", ["short", "a" * 65, "has space1", "../../../x", 123, None, "abcdefgh\n"])
def test_session_id_rules(bad):
    with pytest.raises(UserError, match="is invalid; use 8-64 characters"):
        check_session_id(bad)


HEAVY_MODULES = {"mlx", "torch", "transformers", "numpy", "flask", "llama_cpp", "waitress", "gguf", "safetensors",
                 "peft", "requests", "tqdm"}


def heavy_imports_for_help(script: str) -> set[str]:
    """Top-level packages from HEAVY_MODULES that ``python -X importtime SCRIPT --help`` imports."""
    r = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
    names = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return names & HEAVY_MODULES


@pytest.mark.parametrize("script", ["server.py", "ollama-web-chat.py", "convert_to_huggingface.py", "convert_to_gguf.py"])
def test_help_imports_nothing_heavy(script):
    assert heavy_imports_for_help(script) == set()
