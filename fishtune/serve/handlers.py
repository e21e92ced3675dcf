"""The JSON error responses of the server: always JSON, never a stack trace.

:func:`register_error_handlers` turns the error types of
:mod:`fishtune.serve.errors`, :class:`~fishtune.errors.UserError` (400),
Werkzeug's HTTP errors (404, 405, 413, ...) and anything unexpected (500,
logged with its traceback, answered as ``internal error``) into
``{"error": "..."}``; under ``/v1/`` into OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``
(:func:`fishtune.serve.events.error_payload`).
"""
from __future__ import annotations

import logging

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from fishtune.errors import UserError
from fishtune.serve.errors import (
    API_BLUEPRINT,
    ApiError,
    BackendError,
    StoreError,
    body_too_large,
)
from fishtune.serve.events import error_payload

logger = logging.getLogger(__name__)


def error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> Response:
    resp = jsonify(error_payload(message, status, request.path, param, code))
    resp.status_code = status
    return resp


def api_paths() -> list[str]:
    """The API's paths, read from the app's URL map."""
    rules = current_app.url_map.iter_rules()
    return sorted({rule.rule for rule in rules if rule.endpoint.partition(".")[0] == API_BLUEPRINT})


def on_api_error(exc: ApiError) -> Response:
    return error_response(exc.message, exc.status, exc.param, exc.code)


def on_user_error(exc: UserError) -> Response:
    return error_response(str(exc), 400)


def on_service_error(exc: BackendError | StoreError) -> Response:
    logger.warning("%s", exc)
    return error_response(str(exc), exc.status)


def on_http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    if code == 404:
        msg = f"no such endpoint: {request.method} {request.path}; the API is {', '.join(api_paths())}"
    elif code == 405:
        allowed = ", ".join(sorted(m for m in (exc.valid_methods or []) if m not in ("HEAD", "OPTIONS")))
        msg = f"method {request.method} is not allowed on {request.path}; use {allowed}"
    elif code == 413:
        msg = body_too_large(current_app.config["MAX_CONTENT_LENGTH"])
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
    app.register_error_handler(BackendError, on_service_error)
    app.register_error_handler(StoreError, on_service_error)
    app.register_error_handler(HTTPException, on_http_error)
    app.register_error_handler(Exception, on_internal_error)


__all__ = ["api_paths", "error_response", "register_error_handlers"]
