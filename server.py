#!/usr/bin/env python3
"""server: the web chat page and JSON API, safe for several users at once.

    python3 server.py                                   # MLX: base model + lora_qwen2_1.5b, http://127.0.0.1:5001
    python3 server.py --model models/smoke-tiny --adapter-path models/demo-adapter
    python3 server.py --gguf ollama_model/qwen2-fish.gguf   # llama.cpp, no Ollama needed
    python3 server.py --ollama fish-care-assistant --port 5000   # a running Ollama

API (see README): POST /api/chat {"message": "..."} -> {"response": "...", "session_id": "..."},
"stream": true for Server-Sent Events; POST /api/clear; GET /api/history; GET /api/health;
OpenAI-compatible POST /v1/chat/completions and GET /v1/models.
Served by waitress; binds to loopback unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys

from fishtune.errors import UserError, run_cli, setup_logging

logger = logging.getLogger("server")

DEFAULT_PORT = 5001


def build_parser(prog: str = "server.py", default_port: int = DEFAULT_PORT) -> argparse.ArgumentParser:
    from fishtune.serve.backends import OLLAMA_DEFAULT_URL
    from fishtune.infer.generation import add_sampling_args
    from fishtune.loading import add_model_args

    p = argparse.ArgumentParser(prog=prog, description="Web chat page + JSON API for the fish-care assistant.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 = every network)")
    p.add_argument("--port", type=int, default=default_port, help="port (default: %(default)s)")
    g = p.add_argument_group("model (default: MLX, base model + adapter)")
    add_model_args(g)
    g.add_argument("--gguf", metavar="FILE", default=None,
                   help="serve a GGUF file through llama.cpp instead (template from its metadata/Modelfile)")
    g.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context length for --gguf (default: %(default)s)")
    g.add_argument("--ollama", metavar="MODEL_NAME", default=None,
                   help="answer through a running Ollama with this model, e.g. fish-care-assistant")
    g.add_argument("--ollama-url", default=OLLAMA_DEFAULT_URL, help="Ollama's address (default: %(default)s)")
    g.add_argument("--system", default=None,
                   help="system prompt (default: the one the model was trained with; for Ollama: the Modelfile's)")
    add_sampling_args(p)
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-sessions", type=int, default=1000,
                     help="chat sessions kept; the least recently used is dropped beyond (default: %(default)s)")
    lim.add_argument("--session-ttl", type=float, default=3600.0,
                     help="seconds an idle session is kept (default: %(default)s)")
    lim.add_argument("--max-turns", type=int, default=20, help="earlier turns kept per session (default: %(default)s)")
    lim.add_argument("--max-context-tokens", type=int, default=2048,
                     help="prompt budget for the history, MLX back end (default: %(default)s)")
    lim.add_argument("--max-message-chars", type=int, default=2000,
                     help="longest accepted question (default: %(default)s)")
    lim.add_argument("--max-body-kb", type=int, default=64, help="largest request body in KiB (default: %(default)s)")
    lim.add_argument("--max-tokens-limit", type=int, default=4096,
                     help="largest max_tokens a request may ask for (default: %(default)s)")
    lim.add_argument("--threads", type=int, default=8, help="waitress worker threads (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def make_backend(args):
    from fishtune.serve.backends import LlamaCppBackend, MLXBackend, OllamaBackend

    if args.gguf and args.ollama:
        raise UserError("--gguf and --ollama are two different back ends; pass one of them")
    if args.ollama:
        backend = OllamaBackend(args.ollama, args.ollama_url, system_prompt=args.system)
        problem = backend.check()
        if problem:
            logger.warning("%s (serving anyway; requests get a 503 until Ollama answers)", problem)
        return backend
    if args.gguf:
        if args.n_ctx < 16:
            raise UserError(f"--n-ctx {args.n_ctx} is too small; use 512 or more")
        return LlamaCppBackend(args.gguf, n_ctx=args.n_ctx, system_prompt=args.system)
    return MLXBackend.load(args.model, args.adapter_path, no_adapter=args.no_adapter,
                           context_tokens=args.max_context_tokens, system_prompt=args.system)


def main(argv: list[str] | None = None, *, prog: str = "server.py", default_port: int = DEFAULT_PORT) -> int:
    args = build_parser(prog, default_port).parse_args(argv)
    setup_logging(args.verbose)
    import fishtune  # noqa: F401  (OpenBLAS before mlx)
    from fishtune.infer.generation import sampling_from_args
    from fishtune.serve.app import create_app

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number; use 1-65535")
    for name in ("max_sessions", "max_turns", "max_message_chars", "max_body_kb", "threads", "max_tokens_limit"):
        if getattr(args, name) < (0 if name == "max_turns" else 1):
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.session_ttl <= 0:
        raise UserError(f"--session-ttl {args.session_ttl} must be more than 0 seconds")
    sampling = sampling_from_args(args)
    backend = make_backend(args)
    app = create_app(
        backend, sampling=sampling, max_message_chars=args.max_message_chars, max_body_bytes=args.max_body_kb * 1024,
        max_tokens_limit=args.max_tokens_limit, max_sessions=args.max_sessions, session_ttl_s=args.session_ttl,
        max_turns=args.max_turns,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding to %s: anyone who can reach this machine on port %d can use the model "
                       "(there is no login); use --host 127.0.0.1 to keep it local", args.host, args.port)
    from waitress import create_server

    try:
        # channel_request_lookahead lets waitress notice a client that went away mid-stream.
        server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                               channel_request_lookahead=1, ident="fishtune")
    except OSError as exc:
        raise UserError(f"can't listen on {args.host}:{args.port} ({exc.strerror}); "
                        "is another server running there? pick another --port") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    info = backend.info()
    logger.info("serving %s %s%s on http://%s:%d (Ctrl-C to stop)", info["backend"], info["model"],
                f" + {info['adapter']}" if info.get("adapter") else "", host, args.port)
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.close()
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main)())
