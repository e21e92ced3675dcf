"""The serve stage (``server.py``, ``ollama-web-chat.py``, ``python -m fishtune.serve``): web chat page + JSON API.

Modules (nothing is imported here, so ``--help`` stays cheap)::

    cli --backend_from_args--> backends (MLX / llama.cpp / Ollama)
        --create_app--> app: state + routes + handlers, under waitress (wsgi)

* ``cli``: the flags, the back end they ask for, waitress;
* ``backends``: the back ends behind one interface (``stream_chat``, ``chat``);
* ``app``: ``create_app`` puts the parts below together;
* ``state``: the limits (``ServerConfig``) and what the endpoints share;
* ``routes``: one function per endpoint;
* ``parsing``: request parsing and validation (JSON body, fields, OpenAI messages, session id);
* ``streaming``: admission, the client watch, the generation gate, the one streaming path, the WSGI body;
* ``events``: the wire formats (the seed's SSE, OpenAI chunks, error bodies) and whole answers;
* ``errors``: the error types (``ApiError``, ``BackendError``, ``StoreError``, ...);
* ``handlers``: the JSON error handlers (OpenAI's shape under ``/v1/``);
* ``security``: the Host allowlist and the same-origin rule;
* ``sessions``: session ids, the ``SessionStorage`` protocol, a lock per session in flight;
* ``store``: the conversations in SQLite (a file under ``--data-dir``, or memory), bounded and expiring;
* ``batching``: the MLX back end's scheduler thread (continuous batching);
* ``wsgi``: waitress with the app's body limit and JSON refusals;
* ``static/``: the page (no external assets).
"""
