"""The WSGI application: plain HTTP answers and websocket upgrades.

gunicorn parses each request in a short-lived greenlet. An upgrade is validated and
authenticated here, answered with 101 on the raw socket, and the socket is then *handed over*
to the worker's gateway (``HANDED_OVER``): the request greenlet ends, so an idle websocket keeps
no greenlet (PROTOCOL §2). Everything else gets a short plain HTTP answer. What the app needs of
the gateway is :class:`Backend`; ranger_py.gateway builds both and wires them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Protocol

from ranger_py import gunicorn_adapter
from ranger_py.auth import ANONYMOUS, Auth, Authenticator
from ranger_py.compression import negotiate
from ranger_py.config import Config
from ranger_py.errors import AuthError, HandshakeError
from ranger_py.handshake import accept_key, check_origin, is_upgrade, switching_protocols
from ranger_py.logs import RateLimitedLog
from ranger_py.protocol import streams_from_query

__all__ = ["HANDED_OVER", "App", "Backend"]

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]

# Returned instead of a body when the socket now belongs to the gateway; ranger_py.worker turns it
# into "stop serving this socket, do not close it".
HANDED_OVER: list[bytes] = []


def _status(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


class Backend(Protocol):
    """What the app asks of the worker's gateway (ranger_py.gateway.Gateway)."""

    @property
    def accepting(self) -> bool: ...  # False once the worker is stopping

    @property
    def full(self) -> bool: ...  # RANGER_MAX_CONNECTIONS reached

    @property
    def ready(self) -> bool: ...  # /readyz: would take a websocket now

    @property
    def status(self) -> str: ...  # why not, for /readyz

    @property
    def received(self) -> int: ...  # broker messages this worker received since it started

    def attach(
        self,
        fd: int,
        greeting: bytes,
        auth: Auth,
        path: str,
        streams: list[str],
        *,
        window_bits: int = 0,
    ) -> object: ...

    def auth_failed(self, reason: str) -> None: ...

    def shutdown(self, timeout: float) -> None: ...


class App:
    """One worker's WSGI callable."""

    def __init__(self, config: Config, backend: Backend, authenticator: Authenticator) -> None:
        self.config = config
        self.backend = backend
        self.authenticator = authenticator
        self._refusals = RateLimitedLog(log)

    def close(self, timeout: float) -> None:
        """Stop what the app handed over: every websocket gets 1001 (ranger_py.worker)."""
        self.backend.shutdown(timeout)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            if is_upgrade(environ):
                try:
                    return self._upgrade(environ)
                except HandshakeError as exc:
                    # One line per refused upgrade, never the token; rate-limited, since anyone
                    # on the internet can cause them.
                    self._refusals.log(
                        "refused upgrade %s from %s: %d %s",
                        environ.get("PATH_INFO") or "/",
                        environ.get("REMOTE_ADDR", "-"),
                        exc.status,
                        exc.reason,
                    )
                    raise
            return self._http(environ, start_response)
        except HandshakeError as exc:
            headers = [("Content-Type", "application/json")]
            if exc.status == 426:
                headers.append(("Sec-WebSocket-Version", "13"))
            elif exc.status == 405:
                headers.append(("Allow", "GET"))  # RFC 9110 §15.5.6
            start_response(_status(exc.status), headers)
            return [exc.body]

    # -- plain HTTP --------------------------------------------------------------------------

    def _http(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            raise HandshakeError(400, "only GET health probes and websocket upgrades are served")
        if path == "/healthcheck":  # Ruby Ranger's probe
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"OK"]
        # The JSON answers name the worker process that gave them: several workers share the
        # port, so this tells an operator which one is not ready.
        worker = os.getpid()
        if path == "/healthz":
            # With that worker's own count of broker messages: the metrics endpoint sums every
            # worker's, and broker-side routing makes them differ.
            body = {"status": "ok", "worker": worker, "received": self.backend.received}
            return self._json(start_response, 200, body)
        if path == "/readyz":
            # Ready means this worker would take a websocket now: consuming, not stopping, not
            # full (a load balancer must stop sending clients to a worker that answers 503).
            if self.backend.ready:
                return self._json(start_response, 200, {"status": "ready", "worker": worker})
            return self._json(
                start_response,
                503,
                {"status": "unavailable", "reason": self.backend.status, "worker": worker},
            )
        raise HandshakeError(400, "this endpoint only serves websocket upgrades")

    @staticmethod
    def _json(start_response: StartResponse, code: int, body: object) -> list[bytes]:
        start_response(_status(code), [("Content-Type", "application/json")])
        return [json.dumps(body, separators=(",", ":")).encode()]

    # -- upgrades ----------------------------------------------------------------------------

    def _upgrade(self, environ: dict[str, Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        accept = accept_key(environ)
        check_origin(
            self.config.cors_origins, environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST", "")
        )
        if not self.backend.accepting:
            raise HandshakeError(503, "server is shutting down")
        if self.backend.full:
            raise HandshakeError(503, "too many connections")
        auth = self._authenticate(path, environ.get("HTTP_AUTHORIZATION"))
        streams = streams_from_query(environ.get("QUERY_STRING", ""))
        # PROTOCOL §2: permessage-deflate when offered, on terms that keep no state per client.
        deflate = (
            negotiate(environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS"))
            if self.config.compression
            else None
        )
        greeting = switching_protocols(accept, deflate.response if deflate else None)

        # gunicorn's socket object lets go; the fd is the gateway's now. The 101 goes out in the
        # same send as the first frames (one syscall, no gevent wrapper on the way).
        fd = gunicorn_adapter.detach_socket(environ)
        window_bits = deflate.window_bits if deflate else 0
        self.backend.attach(fd, greeting, auth, path, streams, window_bits=window_bits)
        return HANDED_OVER

    def _authenticate(self, path: str, header: str | None) -> Auth:
        # PROTOCOL §2: /private and /private/ require a valid token; elsewhere it is optional and
        # a bad one leaves the client anonymous (Rango's rule, not Ruby's disconnect).
        required = path.rstrip("/") == "/private"
        if header is None and not required:
            return ANONYMOUS
        try:
            return self.authenticator.authenticate(header)
        except AuthError as exc:
            self.backend.auth_failed(exc.reason)
            if required:
                raise HandshakeError(401, f"Authorization failed: {exc.reason}") from None
            log.debug("optional auth failed on %s: %s", path, exc.reason)
            return ANONYMOUS
