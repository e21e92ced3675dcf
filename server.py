#!/usr/bin/env python3
"""server: the web chat page and JSON API, safe for several users at once.

    python3 server.py                                   # MLX: base model + lora_qwen2_1.5b, http://127.0.0.1:5001
    python3 server.py --model models/smoke-tiny --adapter-path models/demo-adapter
    python3 server.py --gguf ollama_model/qwen2-fish.gguf   # llama.cpp, no Ollama needed
    python3 server.py --ollama fish-care-assistant --port 5000   # a running Ollama

API (see README): POST /api/chat {"message": "..."} -> {"response": "...", "session_id": "..."},
"stream": true for Server-Sent Events; POST /api/clear; GET /api/history; GET /api/health;
OpenAI-compatible POST /v1/chat/completions and GET /v1/models.
Served by waitress; binds to loopback unless --host says otherwise. All logic: ``fishtune/serve/``.
"""
import sys

from fishtune.errors import run_cli
from fishtune.serve.cli import build_parser, main  # noqa: F401  (build_parser: the flags, for tools)

if __name__ == "__main__":
    sys.exit(run_cli(main)())
