"""HTTP errors of the server: always JSON ``{"error": "..."}``, never a stack trace.

:class:`ApiError` is what the endpoints raise for a bad request (4xx) or a
full server (503). :func:`register_error_handlers` turns it, and
:class:`~fishtune.errors.UserError` (400), the back ends'
:class:`~fishtune.serve.backends.BackendError` (502/503), Werkzeug's HTTP
errors (404, 405, 413, ...) and anything unexpected (500) into that JSON.
"""
from __future__ import annotations

import logging

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from fishtune.errors import UserError
from fishtune.serve.backends import BackendError

logger = logging.getLogger(__name__)

API_BLUEPRINT = "api"  # the blueprint whose routes a 404 lists as "the API"


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(message: str, status: int) -> Response:
    resp = jsonify({"error": message})
    resp.status_code = status
    return resp


def api_paths() -> list[str]:
    """The API's paths, read from the app's URL map."""
    rules = current_app.url_map.iter_rules()
    return sorted({rule.rule for rule in rules if rule.endpoint.partition(".")[0] == API_BLUEPRINT})


def on_api_error(exc: ApiError) -> Response:
    return error_response(exc.message, exc.status)


def on_user_error(exc: UserError) -> Response:
    return error_response(str(exc), 400)


def on_backend_error(exc: BackendError) -> Response:
    logger.warning("back end: %s", exc)
    return error_response(str(exc), exc.status)


def on_http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    if code == 404:
        msg = f"no such endpoint: {request.method} {request.path}; the API is {', '.join(api_paths())}"
    elif code == 405:
        allowed = ", ".join(sorted(m for m in (exc.valid_methods or []) if m not in ("HEAD", "OPTIONS")))
        msg = f"method {request.method} is not allowed on {request.path}; use {allowed}"
    elif code == 413:
        msg = (f"request body is over the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes; "
               "send a shorter message")
    else:
        msg = f"{exc.name}: {exc.description}"
    resp = error_response(msg, code)
    if code == 405 and exc.valid_methods:
        resp.headers["Allow"] = ", ".join(exc.valid_methods)
    return resp


def on_internal_error(exc: Exception) -> Response:
    logger.exception("internal error on %s %s", request.method, request.path)
    return error_response("internal error", 500)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, on_api_error)
    app.register_error_handler(UserError, on_user_error)
    app.register_error_handler(BackendError, on_backend_error)
    app.register_error_handler(HTTPException, on_http_error)
    app.register_error_handler(Exception, on_internal_error)


__all__ = ["ApiError", "API_BLUEPRINT", "api_paths", "error_response", "register_error_handlers"]
