"""The serve stage (``server.py``, ``ollama-web-chat.py``, ``python -m fishtune.serve``): web chat page + JSON API.

Modules (nothing is imported here, so ``--help`` stays cheap)::

    cli --backend_from_args--> backends (MLX / llama.cpp / Ollama)
        --create_app--> app: state + routes + errors, under waitress

* ``cli``: the flags, the back end they ask for, waitress;
* ``backends``: the back ends behind one interface (``stream_chat``, ``chat``);
* ``app``: ``create_app`` puts the parts below together;
* ``state``: the limits (``ServerConfig``) and what the endpoints share;
* ``routes``: one function per endpoint;
* ``parsing``: request parsing and validation (JSON body, fields, OpenAI messages, session id);
* ``streaming``: the generation gate, the one streaming path, the WSGI body that cleans up;
* ``events``: the wire formats (the seed's SSE, OpenAI chunks) and whole answers;
* ``errors``: ``ApiError`` and the JSON error handlers;
* ``sessions``: the per-user chat histories (bounded, expiring) behind ``SessionStorage``;
* ``static/``: the page (no external assets).
"""
