#!/usr/bin/env python3
"""ollama-web-chat: the seed's Ollama web chat, now the project's chat page over a running Ollama.

    ollama create fish-care-assistant -f Modelfile   # once
    python3 ollama-web-chat.py                       # http://localhost:5000

Same as ``python3 server.py --ollama fish-care-assistant --port 5000``; every
server.py flag works here too (e.g. --ollama-url, --port, --ollama other-model).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from fishtune.errors import run_cli


def _server():
    spec = importlib.util.spec_from_file_location("fishtune_server_script", Path(__file__).resolve().parent / "server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_parser():
    return _server().build_parser("ollama-web-chat.py", 5000)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--ollama" or a.startswith("--ollama=") for a in argv):
        argv = ["--ollama", "fish-care-assistant", *argv]
    return _server().main(argv, prog="ollama-web-chat.py", default_port=5000)


if __name__ == "__main__":
    sys.exit(run_cli(main)())
