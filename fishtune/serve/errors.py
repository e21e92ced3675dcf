"""The server's error types, each with its HTTP status (no imports beyond the standard library).

The back ends, the store and the endpoints raise them: :class:`ApiError` (a
bad request, 4xx, or a full server, 503), :class:`BackendError` (502) and
:class:`BackendUnavailable` (503) from the back ends, :class:`StoreError`
(503) from the conversation store. :mod:`fishtune.serve.handlers` turns them
into JSON responses.
"""
from __future__ import annotations

API_BLUEPRINT = "api"  # the blueprint whose routes a 404 lists as "the API"


class ApiError(Exception):
    """An HTTP error with a JSON body; ``param``/``code`` fill OpenAI's fields under ``/v1/``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class BackendError(Exception):
    """The back end failed to answer (HTTP 502); the message is shown to the user."""

    status = 502


class BackendUnavailable(BackendError):
    """The back end can't be reached at all (HTTP 503), e.g. Ollama isn't running."""

    status = 503


class StoreError(Exception):
    """The conversation store could not be read or written (HTTP 503)."""

    status = 503


def body_too_large(limit: int) -> str:
    """The refusal of a body over ``limit`` bytes (Flask's and waitress's, :mod:`fishtune.serve.wsgi`)."""
    return f"request body is over the limit of {limit} bytes; send a shorter message"


__all__ = ["ApiError", "BackendError", "BackendUnavailable", "StoreError", "API_BLUEPRINT", "body_too_large"]
