#!/usr/bin/env python3
"""ollama-web-chat: the seed's Ollama web chat, now the project's chat page over a running Ollama.

    ollama create fish-care-assistant -f Modelfile   # once
    python3 ollama-web-chat.py                       # http://localhost:5000

Same as ``python3 server.py --ollama fish-care-assistant --port 5000``; every
server.py flag works here too (e.g. --ollama-url, --port, --ollama other-model).
"""
import sys

from fishtune.errors import run_cli
from fishtune.serve.cli import ollama_build_parser as build_parser  # noqa: F401  (the flags, for tools)
from fishtune.serve.cli import ollama_main as main

if __name__ == "__main__":
    sys.exit(run_cli(main)())
