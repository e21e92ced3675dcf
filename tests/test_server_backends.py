"""server.py over the other back ends: llama.cpp (--gguf) and Ollama (--ollama), plus app-level checks.

llama.cpp is real (a GGUF written from the smoke model by our GGUF writer);
Ollama can't be installed here, so tests/fake_ollama.py stands in for it
behind the real server process and the real HTTP client code.
"""
from __future__ import annotations

import re

import pytest
import requests
from conftest import ServerProcess, free_port, sse_events
from fake_ollama import FakeOllama

from fishtune.errors import UserError
from fishtune.infer.generation import SamplingConfig

# ---- Ollama -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake():
    with FakeOllama() as f:
        yield f


@pytest.fixture(scope="module")
def ollama_server(fake, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ollama")
    srv = ServerProcess(["--ollama", "fish-care-assistant", "--ollama-url", fake.url, "--max-tokens", "64",
                         "--temperature", "0.2", "--data-dir", folder / "data"], folder / "server.log")
    yield srv
    srv.stop()


def test_ollama_chat_not_streamed_keeps_history(ollama_server, fake):
    s = requests.Session()
    r1 = s.post(ollama_server.url + "/api/chat", json={"message": "孔雀鱼多久换水？"}, timeout=30).json()
    assert r1["response"] == "答：孔雀鱼多久换水？（第1轮）"
    r2 = s.post(ollama_server.url + "/api/chat", json={"message": "水温呢？", "top_k": 20}, timeout=30).json()
    assert r2 == {"response": "答：水温呢？（第2轮）", "session_id": r1["session_id"]}
    sent = fake.requests[-1]
    assert sent["model"] == "fish-care-assistant" and sent["stream"] is False
    # the history goes to Ollama as messages; no system message: the Modelfile's SYSTEM applies
    assert sent["messages"] == [{"role": "user", "content": "孔雀鱼多久换水？"},
                                {"role": "assistant", "content": "答：孔雀鱼多久换水？（第1轮）"},
                                {"role": "user", "content": "水温呢？"}]
    assert sent["options"]["num_predict"] == 64 and sent["options"]["temperature"] == 0.2
    assert sent["options"]["top_k"] == 20
    h = requests.get(ollama_server.url + "/api/health", timeout=10).json()
    assert h["status"] == "ok" and h["backend"] == "ollama" and h["model"] == "fish-care-assistant"


def test_ollama_streamed_ndjson_to_sse(ollama_server, fake):
    s = requests.Session()
    r = s.post(ollama_server.url + "/api/chat", json={"message": "白点病怎么治？", "stream": True},
               stream=True, timeout=30)
    events = sse_events(r)
    assert fake.requests[-1]["stream"] is True
    *deltas, done = events
    assert len(deltas) > 3  # the fake sends 2 characters per NDJSON line
    assert "".join(d["delta"] for d in deltas) == "答：白点病怎么治？（第1轮）"
    assert done == {"done": True, "finish_reason": "stop", "session_id": s.cookies.get("fishtune_session")}
    hist = s.get(ollama_server.url + "/api/history", timeout=10).json()["messages"]
    assert hist[-1] == {"role": "assistant", "content": "答：白点病怎么治？（第1轮）"}
    # max_tokens reaches Ollama as num_predict; its done_reason "length" comes back
    r = requests.post(ollama_server.url + "/api/chat", json={"message": "很长的问题" * 5, "max_tokens": 2,
                                                              "stream": True}, stream=True, timeout=30)
    assert sse_events(r)[-1]["finish_reason"] == "length"


def test_ollama_openai_compatible(ollama_server):
    body = {"model": "fish-care-assistant", "messages": [{"role": "user", "content": "你好"}]}
    r = requests.post(ollama_server.url + "/v1/chat/completions", json=body, timeout=30).json()
    assert r["choices"][0]["message"]["content"] == "答：你好（第1轮）"
    events = sse_events(requests.post(ollama_server.url + "/v1/chat/completions", json={**body, "stream": True},
                                      stream=True, timeout=30))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "答：你好（第1轮）"
    assert requests.get(ollama_server.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "fish-care-assistant"


def test_ollama_not_running_is_a_clear_503(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    srv = ServerProcess(["--ollama", "fish-care-assistant", "--ollama-url", dead, "--no-persist"], tmp_path / "server.log")
    try:
        assert f"can't reach Ollama at {dead}" in srv.log()  # warned at start, serves anyway
        h = requests.get(srv.url + "/api/health", timeout=10).json()
        assert h["status"] == "degraded" and "is Ollama running?" in h["detail"]
        for stream in (False, True):
            r = requests.post(srv.url + "/api/chat", json={"message": "你好", "stream": stream}, timeout=30)
            assert r.status_code == 503
            err = r.json()["error"]
            assert f"can't reach Ollama at {dead}" in err and "is Ollama running? start it with `ollama serve`" in err
        r = requests.post(srv.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True}, timeout=30)
        assert r.status_code == 503 and "ollama serve" in r.json()["error"]["message"]
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def test_ollama_unknown_model_says_how_to_create_it(fake, tmp_path):
    srv = ServerProcess(["--ollama", "no-such-model", "--ollama-url", fake.url, "--no-persist"], tmp_path / "server.log")
    try:
        assert "has no model 'no-such-model'" in requests.get(srv.url + "/api/health", timeout=10).json()["detail"]
        r = requests.post(srv.url + "/api/chat", json={"message": "你好"}, timeout=30)
        assert r.status_code == 502
        assert 'model "no-such-model" not found' in r.json()["error"]
        assert "ollama create no-such-model -f Modelfile" in r.json()["error"]
    finally:
        srv.stop()


def test_ollama_web_chat_wrapper(fake, tmp_path):
    from fishtune.serve.cli import ollama_build_parser

    args = ollama_build_parser().parse_args([])
    assert args.port == 5000 and args.host == "127.0.0.1"  # the seed's port
    srv = ServerProcess(["--ollama-url", fake.url, "--data-dir", tmp_path / "data"], tmp_path / "server.log",
                        script="ollama-web-chat.py")
    try:
        h = requests.get(srv.url + "/api/health", timeout=10).json()
        assert h["backend"] == "ollama" and h["model"] == "fish-care-assistant"
        page = requests.get(srv.url + "/", timeout=10)
        assert page.status_code == 200 and "鱼病护理助手" in page.text
        r = requests.post(srv.url + "/api/chat", json={"message": "你好"}, timeout=30).json()
        assert r["response"] == "答：你好（第1轮）"
    finally:
        srv.stop()


# ---- llama.cpp (--gguf) -------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(smoke_model_dir, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from fishtune.export.gguf_writer import read_hf_model, write_gguf
    from fishtune.project import ProjectMeta

    out = tmp_path_factory.mktemp("gguf") / "smoke-f16.gguf"
    write_gguf(read_hf_model(smoke_model_dir), ProjectMeta(base_model=str(smoke_model_dir)), out, "F16",
               progress=False)
    return out


def test_gguf_server_page_and_api(gguf_file, tmp_path):
    srv = ServerProcess(["--gguf", gguf_file, "--max-tokens", "8", "--temperature", "0", "--n-ctx", "512",
                         "--data-dir", tmp_path / "data"], tmp_path / "server.log")
    try:
        h = requests.get(srv.url + "/api/health", timeout=10).json()
        assert h["backend"] == "llama.cpp" and h["model"] == gguf_file.name and h["template"] == "alpaca"
        assert "template from the GGUF metadata" in srv.log()
        assert "鱼病护理助手" in requests.get(srv.url + "/", timeout=10).text
        s = requests.Session()
        r = s.post(srv.url + "/api/chat", json={"message": "鱼缸水发白怎么办？"}, timeout=60).json()
        assert isinstance(r["response"], str) and r["response"].strip()  # random weights: 8 tokens of noise
        # greedy: streaming the same question in a new session gives the same text
        events = sse_events(requests.post(srv.url + "/api/chat", json={"message": "鱼缸水发白怎么办？", "stream": True},
                                          stream=True, timeout=60))
        assert "".join(e.get("delta", "") for e in events[:-1]) == r["response"]
        assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length")
        s.post(srv.url + "/api/chat", json={"message": "第二个问题"}, timeout=60)
        assert len(s.get(srv.url + "/api/history", timeout=10).json()["messages"]) == 4
        o = requests.post(srv.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "鱼缸水发白怎么办？"}]}, timeout=60).json()
        assert o["choices"][0]["message"]["content"] == r["response"]
        assert o["usage"]["prompt_tokens"] > 10 and 1 <= o["usage"]["completion_tokens"] <= 8
        r = requests.post(srv.url + "/api/chat", json={"message": "x", "temperature": 7}, timeout=30)
        assert r.status_code == 400 and "temperature=7 is out of range" in r.json()["error"]
    finally:
        srv.stop()


def test_quantized_gguf_server(gguf_file, tmp_path):
    """A llama.cpp-quantized (Q4_K_M) file serves too: quantized kernels, multi-token prompts.

    The server loads through fishtune.export.llama_cpp.open_llama (no weight repacking there):
    llama.cpp's AMX path crashes on quantized models in some VMs, and this one advertises AMX.
    """
    from fishtune.export.llama_cpp import quantize

    q4 = tmp_path / "smoke-q4_k_m.gguf"
    quantize(gguf_file, q4, "Q4_K_M", nthread=2)
    srv = ServerProcess(["--gguf", q4, "--max-tokens", "6", "--temperature", "0", "--n-ctx", "512",
                         "--data-dir", tmp_path / "data"], tmp_path / "server.log")
    try:
        s = requests.Session()
        r = s.post(srv.url + "/api/chat", json={"message": "鱼缸水发白怎么办？请详细说说原因和处理办法。"}, timeout=60)
        assert r.status_code == 200 and r.json()["response"].strip()
        events = sse_events(s.post(srv.url + "/api/chat", json={"message": "还有呢？", "stream": True},
                                   stream=True, timeout=60))
        assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length")
        assert len(s.get(srv.url + "/api/history", timeout=10).json()["messages"]) == 4
        assert srv.proc.poll() is None and "Traceback" not in srv.log()
    finally:
        srv.stop()


def test_gguf_system_prompt_from_modelfile(gguf_file):
    from fishtune.export.gguf_meta import gguf_project_meta
    from fishtune.export.modelfile import render_modelfile
    from fishtune.serve.backends import LlamaCppBackend
    from fishtune.template import get_template

    folder = gguf_file.parent
    (folder / "Modelfile").write_text(render_modelfile(f"./{gguf_file.name}", get_template(), "测试用的系统提示", 512),
                                      encoding="utf-8")
    try:
        tpl, system, source = gguf_project_meta(gguf_file, {})  # no chat_template: the Modelfile's TEMPLATE
        assert tpl.name == "alpaca" and system == "测试用的系统提示" and "template from" in source
        b = LlamaCppBackend(str(gguf_file), n_ctx=256)
        try:
            assert b.system_prompt == "测试用的系统提示"
            res = b.chat([{"role": "user", "content": "你好"}], SamplingConfig(temperature=0, max_tokens=4))
            assert res.prompt_tokens > 5 and res.finish_reason in ("stop", "length")
            assert res.text and res.generation_tokens == 4 or res.finish_reason == "stop"
            with pytest.raises(UserError, match="more than the context of 256; send a shorter message"):
                b.chat([{"role": "user", "content": "鱼" * 600}], SamplingConfig(max_tokens=4))
        finally:
            b.close()
    finally:
        (folder / "Modelfile").unlink()


# ---- app-level (in-process Flask test client, real Ollama client code against the fake) ----


def test_app_internal_error_is_json_without_traceback(fake):
    from fishtune.serve.app import create_app
    from fishtune.serve.backends import OllamaBackend

    app = create_app(OllamaBackend("fish-care-assistant", fake.url))

    def boom():
        raise RuntimeError("secret internals")

    app.add_url_rule("/api/boom", "boom", boom)
    c = app.test_client()
    r = c.get("/api/boom")
    assert r.status_code == 500 and r.get_json() == {"error": "internal error"}
    assert b"secret" not in r.data and b"Traceback" not in r.data
    assert c.get("/api/health").status_code == 200  # still serving


def test_page_assets_are_local_and_headers(fake):
    from fishtune.serve.app import create_app
    from fishtune.serve.backends import OllamaBackend
    from fishtune.serve.parsing import COOKIE

    c = create_app(OllamaBackend("fish-care-assistant", fake.url)).test_client()
    r = c.get("/")
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and 'name="viewport"' in html
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert f"{COOKIE}=" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(ref.startswith("/static/") for ref in refs), refs  # no CDN
    for ref in refs:
        assert c.get(ref).status_code == 200, ref
    js = c.get("/static/app.js").get_data(as_text=True)
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "textContent" in js
    assert c.get("/favicon.ico").status_code == 200
