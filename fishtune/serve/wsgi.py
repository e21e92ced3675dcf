"""waitress for the app: the app's body limit enforced by the server itself, and its own refusals in JSON.

waitress accepts request bodies up to its own ``max_request_body_size``
(1 GiB by default), spooling them to a temporary file, before the app could
refuse them. :func:`make_server` sets that limit to the app's
(``--max-body-kb``), so a larger body is refused while its headers are read
(``Content-Length``) or as soon as a chunked body passes the limit, and
:class:`JsonErrorTask` makes that refusal (and waitress's other ones: a
malformed request, headers too large) the same JSON as the app's errors.
"""
from __future__ import annotations

import json
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from fishtune.serve.errors import body_too_large
from fishtune.serve.events import error_payload


class JsonErrorTask(ErrorTask):
    """waitress's refusal of a request it could not hand to the app, as the app's JSON error."""

    def execute(self) -> None:
        err = self.request.error
        limit = self.channel.server.adj.max_request_body_size - 1  # make_server sets it one above the app's
        message = body_too_large(limit) if err.code == 413 else f"{err.reason}: {err.body}"
        body = json.dumps(error_payload(message, err.code, self.request.path or "/"), ensure_ascii=False).encode()
        self.status = f"{err.code} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def make_server(app: Any, *, host: str, port: int, threads: int, max_body_bytes: int) -> Any:
    """A waitress server for ``app`` that refuses bodies over ``max_body_bytes`` itself, in JSON."""
    sockets: dict = {}
    # channel_request_lookahead lets waitress notice a client that went away while its request runs.
    server = create_server(app, map=sockets, host=host, port=port, threads=threads, channel_request_lookahead=1,
                           ident="fishtune", max_request_body_size=max_body_bytes + 1)  # waitress refuses >= its limit
    for dispatcher in sockets.values():
        if isinstance(dispatcher, BaseWSGIServer):
            dispatcher.channel_class = JsonErrorChannel
    return server


__all__ = ["make_server", "JsonErrorTask", "JsonErrorChannel"]
