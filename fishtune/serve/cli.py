"""``server.py`` (also ``python -m fishtune.serve``) and ``ollama-web-chat.py``: the web chat under waitress.

``server.py`` serves MLX (base model + adapter) by default, a GGUF through
llama.cpp with ``--gguf`` or a running Ollama with ``--ollama``, on
127.0.0.1:5001. ``ollama-web-chat.py`` is the seed's Ollama web chat: the
same server with ``--ollama fish-care-assistant`` and port 5000 unless told
otherwise (:func:`ollama_main`). Conversations are kept in
``--data-dir``/server.sqlite3 (``--no-persist``: in memory).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from fishtune.errors import UserError, setup_logging

logger = logging.getLogger(__name__)

DEFAULT_PORT = 5001
OLLAMA_PROG = "ollama-web-chat.py"
OLLAMA_PORT = 5000  # the seed's
OLLAMA_MODEL = "fish-care-assistant"  # `ollama create fish-care-assistant -f Modelfile`

# the smallest value each limit flag takes
LIMIT_MINIMUMS = {"max_sessions": 1, "max_turns": 0, "max_message_chars": 1, "max_body_kb": 1,
                  "threads": 3, "max_tokens_limit": 1, "max_batch": 1}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
RESERVED_THREADS = 2  # waitress threads that never generate: the page, health, history and clear stay fast
DB_FILE = "server.sqlite3"  # in --data-dir


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/fishtune``, else ``~/.local/share/fishtune``: user data, outside the repository."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "fishtune"


def build_parser(prog: str = "server.py", default_port: int = DEFAULT_PORT,
                 default_ollama: str | None = None) -> argparse.ArgumentParser:
    from fishtune.infer.generation import add_sampling_args
    from fishtune.loading import add_model_args
    from fishtune.serve.backends import OLLAMA_DEFAULT_URL

    p = argparse.ArgumentParser(prog=prog, description="Web chat page + JSON API for the fish-care assistant.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 = every network)")
    p.add_argument("--port", type=int, default=default_port, help="port (default: %(default)s)")
    g = p.add_argument_group("model (default: MLX, base model + adapter)")
    add_model_args(g)
    g.add_argument("--gguf", metavar="FILE", default=None,
                   help="serve a GGUF file through llama.cpp instead (template from its metadata/Modelfile)")
    g.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context length for --gguf (default: %(default)s)")
    g.add_argument("--ollama", metavar="MODEL_NAME", default=default_ollama,
                   help="answer through a running Ollama with this model, e.g. fish-care-assistant")
    g.add_argument("--ollama-url", default=OLLAMA_DEFAULT_URL, help="Ollama's address (default: %(default)s)")
    g.add_argument("--system", default=None,
                   help="system prompt (default: the one the model was trained with; for Ollama: the Modelfile's)")
    g.add_argument("--max-batch", type=int, default=16,
                   help="MLX: requests decoded together in one batch; more wait for a place (default: %(default)s)")
    add_sampling_args(p)
    st = p.add_argument_group("conversations")
    st.add_argument("--data-dir", type=Path, default=None,
                    help=f"folder of the conversation store {DB_FILE} (default: {default_data_dir()}, "
                         "i.e. $XDG_DATA_HOME/fishtune)")
    st.add_argument("--no-persist", action="store_true",
                    help="keep conversations in memory only: they are gone when the server stops")
    st.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="also answer requests for this Host name (repeatable; default: localhost, 127.0.0.1, [::1] "
                         "and the --host address; '*' = any name)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-sessions", type=int, default=1000,
                     help="chat sessions kept; the least recently used is dropped beyond (default: %(default)s)")
    lim.add_argument("--session-ttl", type=float, default=3600.0,
                     help="seconds an idle session is kept (default: %(default)s)")
    lim.add_argument("--max-turns", type=int, default=20, help="earlier turns kept per session (default: %(default)s)")
    lim.add_argument("--max-context-tokens", type=int, default=2048,
                     help="MLX: prompt budget in tokens; the history is cut to it, a longer prompt (e.g. OpenAI "
                          "messages) gets a 400 (default: %(default)s)")
    lim.add_argument("--max-message-chars", type=int, default=2000,
                     help="longest accepted question (default: %(default)s)")
    lim.add_argument("--max-body-kb", type=int, default=64, help="largest request body in KiB (default: %(default)s)")
    lim.add_argument("--max-tokens-limit", type=int, default=4096,
                     help="largest max_tokens a request may ask for (default: %(default)s)")
    lim.add_argument("--threads", type=int, default=32,
                     help=f"waitress worker threads; all but {RESERVED_THREADS} may generate at once, more requests "
                          "get a 503 (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def ollama_build_parser() -> argparse.ArgumentParser:
    """``ollama-web-chat.py``'s flags: server.py's, with the seed's port and model as defaults."""
    return build_parser(OLLAMA_PROG, OLLAMA_PORT, OLLAMA_MODEL)


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number; use 1-65535")
    for name, lowest in LIMIT_MINIMUMS.items():
        if getattr(args, name) < lowest:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least {lowest}")
    if args.session_ttl <= 0:
        raise UserError(f"--session-ttl {args.session_ttl} must be more than 0 seconds")
    if args.no_persist and args.data_dir is not None:
        raise UserError("--no-persist keeps nothing on disk, so --data-dir has no use; pass one of them")


def backend_from_args(args: argparse.Namespace):
    """The back end the flags ask for: Ollama, llama.cpp or (by default) MLX."""
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
    from fishtune.loading import load_from_args

    return MLXBackend(load_from_args(args), context_tokens=args.max_context_tokens, system_prompt=args.system,
                      max_batch=args.max_batch)


def store_path(args: argparse.Namespace) -> Path | None:
    """The SQLite file of the conversations (None: in memory, ``--no-persist``)."""
    if args.no_persist:
        return None
    return (args.data_dir or default_data_dir()) / DB_FILE


def serve(app, backend, args: argparse.Namespace) -> None:
    """Run ``app`` under waitress until Ctrl-C or a signal; then close the server and the back end."""
    from fishtune.serve.wsgi import make_server

    if args.host not in LOCAL_HOSTS:
        logger.warning("binding to %s: anyone who can reach this machine on port %d can use the model "
                       "(there is no login); use --host 127.0.0.1 to keep it local. Only requests for the Host "
                       "names localhost, 127.0.0.1, [::1] and %s are answered: add the names clients use with "
                       "--allow-host NAME", args.host, args.port, args.host)
    try:
        server = make_server(app, host=args.host, port=args.port, threads=args.threads,
                             max_body_bytes=args.max_body_kb * 1024)
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


def main(argv: list[str] | None = None, *, prog: str = "server.py", default_port: int = DEFAULT_PORT,
         default_ollama: str | None = None) -> int:
    args = build_parser(prog, default_port, default_ollama).parse_args(argv)
    setup_logging(args.verbose)
    from fishtune.infer.generation import sampling_from_args
    from fishtune.serve.app import close_app, create_app

    check_args(args)
    sampling = sampling_from_args(args)
    backend = backend_from_args(args)
    try:
        path = store_path(args)
        app = create_app(
            backend, sampling=sampling, max_message_chars=args.max_message_chars,
            max_body_bytes=args.max_body_kb * 1024, max_tokens_limit=args.max_tokens_limit,
            max_sessions=args.max_sessions, session_ttl_s=args.session_ttl, max_turns=args.max_turns,
            max_active=args.threads - RESERVED_THREADS, store_path=path, allow_hosts=args.allow_host,
            bind_host=args.host,
        )
        logger.info("conversations: %s", path or "in memory only (--no-persist)")
        try:
            serve(app, backend, args)
        finally:
            close_app(app)
    finally:
        backend.close()
    return 0


def ollama_main(argv: list[str] | None = None) -> int:
    """``ollama-web-chat.py``: ``main`` with ``--ollama fish-care-assistant --port 5000`` unless given."""
    return main(argv, prog=OLLAMA_PROG, default_port=OLLAMA_PORT, default_ollama=OLLAMA_MODEL)


__all__ = ["build_parser", "ollama_build_parser", "backend_from_args", "check_args", "serve", "main", "ollama_main",
           "DEFAULT_PORT"]
