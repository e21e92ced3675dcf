"""Which requests the server answers at all: the Host allowlist and the same-origin rule.

* **Host** (DNS rebinding): a page on ``evil.example`` whose name is made to
  resolve to 127.0.0.1 reaches the server with ``Host: evil.example``. Only
  the names in :class:`HostPolicy` are answered (any port): the loopback
  names ``localhost``, ``127.0.0.1`` and ``[::1]``, the ``--host`` address
  when it is a specific one, and each ``--allow-host NAME`` (``*`` turns the
  check off, e.g. behind a reverse proxy that checks it). Any other Host
  gets a 403 (JSON) before routing, so nothing, not even a redirect, is
  built from it.
* **Origin** (cross-site request forgery): a browser always sends ``Origin``
  with a POST. A state-changing request (every POST) whose ``Origin`` (or,
  without one, ``Referer``) is not this server's own origin (``Host``,
  scheme http or https) gets a 403, so a page on another site or on another
  127.0.0.1 port can't chat or clear in a user's name. Clients that are not
  browsers (curl, SDKs) send neither header and are not affected. POST
  bodies must also be JSON (:func:`fishtune.serve.parsing.json_body`): a
  cross-origin ``application/json`` request needs a CORS preflight, which
  this server never grants.
"""
from __future__ import annotations

from typing import Iterable
from urllib.parse import urlsplit

from flask import request

from fishtune.errors import clip
from fishtune.serve.errors import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def host_name(host: str) -> str:
    """The name part of a ``Host`` value, lower case: ``[::1]:5001`` -> ``::1``, ``Localhost.:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


class HostPolicy:
    """The Host names this server answers to (any port)."""

    def __init__(self, allow: Iterable[str] = (), bind: str | None = None):
        extra = [host_name(a) for a in allow if a]
        if bind is not None and bind not in WILDCARD_BINDS:
            extra.append(host_name(bind))
        self.any = ANY_HOST in extra
        self.names = tuple(dict.fromkeys([*LOOPBACK_NAMES, *(n for n in extra if n != ANY_HOST)]))

    def allows(self, host: str) -> bool:
        return self.any or host_name(host) in self.names

    def describe(self) -> str:
        return "any name" if self.any else ", ".join(f"[{n}]" if ":" in n else n for n in self.names)

    def check_host(self) -> None:
        host = request.headers.get("Host", "")
        if not self.allows(host):
            raise ApiError(403, f"Host {clip(host)!r} is not a name this server answers to ({self.describe()}); "
                                "to serve it under another name, start it with --allow-host NAME")


def check_same_origin() -> None:
    """403 for a POST sent by a page of another origin (its ``Origin``, else its ``Referer``)."""
    if request.method != "POST":
        return
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if source is None:
        return  # not a browser page: curl, SDKs
    parts = urlsplit(source)
    if source == "null" or parts.scheme not in ("http", "https") or parts.netloc.lower() != request.host.lower():
        raise ApiError(403, f"cross-origin request refused: {clip(source)} is not this server's page "
                            f"(http://{request.host}); use the chat page, or a client that is not a browser")


__all__ = ["HostPolicy", "check_same_origin", "host_name", "LOOPBACK_NAMES"]
