"""A small stand-in for Ollama's HTTP API, for tests only (Ollama can't be installed here).

Speaks ``POST /api/chat`` like Ollama: ``"stream": true`` (Ollama's default)
-> NDJSON lines ``{"model", "created_at", "message": {"role": "assistant",
"content": piece}, "done": false}`` then a final ``{"done": true,
"done_reason": "stop"|"length", "prompt_eval_count", "eval_count", ...}``;
``"stream": false`` -> one JSON object with the whole ``message``. Also
``GET /api/tags`` and ``GET /api/version``. An unknown model gets Ollama's
404 ``{"error": "model \\"x\\" not found, try pulling it first"}``.

The answer is a deterministic function of the request so tests can tell
sessions apart: ``答：<last user message>（第N轮）`` where N counts the user
messages, or a fixed reply per model name (``replies``). A model named in
``failing`` breaks off a streamed answer after its first piece with an
``{"error": ...}`` line, as Ollama does when generation fails. Every request
body is recorded in ``requests``.

    python tests/fake_ollama.py --port 11434      # by hand
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def default_reply(messages: list[dict[str, Any]]) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return f"答：{users[-1] if users else ''}（第{len(users)}轮）"


class FakeOllama:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, models: tuple[str, ...] = ("fish-care-assistant",),
                 replies: dict[str, str] | None = None, piece_chars: int = 2, delay_s: float = 0.01,
                 failing: tuple[str, ...] = ()):
        self.models = set(models) | set(replies or {}) | set(failing)
        self.failing = set(failing)
        self.replies = dict(replies or {})
        self.piece_chars = piece_chars
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _json(self, code: int, obj: Any) -> None:
                data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/api/tags":
                    self._json(200, {"models": [{"name": f"{m}:latest", "model": f"{m}:latest"}
                                                for m in sorted(fake.models)]})
                elif self.path == "/api/version":
                    self._json(200, {"version": "0.0.0-fake"})
                elif self.path == "/":
                    self._json(200, "Ollama is running")
                else:
                    self._json(404, {"error": "404 page not found"})

            def do_POST(self):
                if self.path != "/api/chat":
                    self._json(404, {"error": "404 page not found"})
                    return
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except ValueError:
                    self._json(400, {"error": "invalid JSON"})
                    return
                with fake._lock:
                    fake.requests.append(body)
                model = str(body.get("model", "")).removesuffix(":latest")
                if model not in fake.models:
                    self._json(404, {"error": f'model "{model}" not found, try pulling it first'})
                    return
                messages = body.get("messages") or []
                text = fake.replies.get(model) or default_reply(messages)
                limit = (body.get("options") or {}).get("num_predict")
                reason = "stop"
                if isinstance(limit, int) and limit > 0 and len(text) > limit * 4:
                    text, reason = text[: limit * 4], "length"  # "tokens": 4 characters each here
                prompt_count = sum(len(m.get("content", "")) for m in messages)
                final = {"model": body.get("model"), "created_at": _now(), "done": True, "done_reason": reason,
                         "total_duration": 1000, "prompt_eval_count": prompt_count,
                         "eval_count": max(1, len(text) // 2)}
                if body.get("stream", True) is False:
                    self._json(200, {**final, "message": {"role": "assistant", "content": text}})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for i in range(0, len(text), fake.piece_chars):
                        self._chunk({"model": body.get("model"), "created_at": _now(),
                                     "message": {"role": "assistant", "content": text[i:i + fake.piece_chars]},
                                     "done": False})
                        if model in fake.failing:
                            self._chunk({"error": "fake failure: the model runner stopped"})
                            break
                        time.sleep(fake.delay_s)
                    else:
                        self._chunk({**final, "message": {"role": "assistant", "content": ""}})
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: Ollama stops generating too

            def _chunk(self, obj: Any) -> None:
                data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> "FakeOllama":
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeOllama":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=11434)
    ap.add_argument("--model", action="append", default=None)
    a = ap.parse_args()
    fake = FakeOllama(port=a.port, models=tuple(a.model or ["fish-care-assistant"]))
    print(f"fake Ollama on {fake.url}", flush=True)
    fake.server.serve_forever()
