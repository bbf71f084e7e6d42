"""ranger_py.app: WSGI calls with hand-built environs, against a Backend of the test's own.

Tokens are real: an Ed25519 key made here, tokens signed with PyJWT (as in test_auth.py), and
the app's own Authenticator checks them.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ranger_py.app import HANDED_OVER, App
from ranger_py.auth import ANONYMOUS, Auth, Authenticator
from ranger_py.config import Config

# RFC 6455 §1.3's worked example.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GREETING = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
PID = os.getpid()


class Backend:
    """The gateway as the app sees it (ranger_py.app.Backend), with what the app asked kept."""

    def __init__(self) -> None:
        self.accepting = True
        self.full = False
        self.ready = True
        self.status = "consuming"
        self.received = 0
        self.attached: list[tuple[int, bytes, Auth, str, list[str]]] = []
        self.windows: list[int] = []  # the permessage-deflate window of each attach
        self.auth_failures: list[str] = []
        self.shutdowns: list[float] = []

    def attach(
        self,
        fd: int,
        greeting: bytes,
        auth: Auth,
        path: str,
        streams: list[str],
        *,
        window_bits: int = 0,
    ) -> object:
        self.attached.append((fd, greeting, auth, path, streams))
        self.windows.append(window_bits)
        os.close(fd)  # the socket is the backend's now
        return object()

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.append(reason)

    def shutdown(self, timeout: float) -> None:
        self.shutdowns.append(timeout)


class Response:
    """What start_response was given, and the body the app returned."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]]) -> None:
        self.calls.append((status, headers))

    @property
    def status(self) -> str:
        assert len(self.calls) == 1, self.calls
        return self.calls[0][0]

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.calls[0][1])


@pytest.fixture(scope="module")
def signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def authenticator(signing_key: ed25519.Ed25519PrivateKey) -> Authenticator:
    pem = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Authenticator(base64.b64encode(pem).decode())


def token(key: ed25519.Ed25519PrivateKey, uid: str = "IDUSER000001", role: str = "member") -> str:
    now = int(time.time())
    claims = {"iat": now, "exp": now + 3600, "uid": uid, "role": role}
    return jwt.encode(claims, key, algorithm="EdDSA")


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def app(backend: Backend, authenticator: Authenticator) -> App:
    return App(Config.from_env({}), backend, authenticator)


@pytest.fixture
def conn() -> Iterator[socket.socket]:
    """The server end of a connection, as gunicorn hands it over in ``gunicorn.socket``."""
    server, client = socket.socketpair()
    yield server
    server.close()
    client.close()


def get(path: str, method: str = "GET", query: str = "") -> dict[str, Any]:
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}


def upgrade(path: str, sock: socket.socket | None = None, **extra: Any) -> dict[str, Any]:
    environ = {
        **get(path),
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        "HTTP_SEC_WEBSOCKET_KEY": KEY,
        "REMOTE_ADDR": "192.0.2.7",
    }
    if sock is not None:
        environ["gunicorn.socket"] = sock
    environ.update(extra)
    return environ


def call(app: App, environ: dict[str, Any]) -> tuple[Response, bytes]:
    response = Response()
    body = b"".join(app(environ, response))
    return response, body


def refused(app: App, environ: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    response, body = call(app, environ)
    assert response.headers["Content-Type"] == "application/json"
    return response.status, response.headers, body


# -- plain HTTP ------------------------------------------------------------------------------


def test_healthcheck_is_rangers_plain_ok(app: App) -> None:
    response, body = call(app, get("/healthcheck"))
    assert (response.status, response.headers, body) == (
        "200 OK",
        {"Content-Type": "text/plain"},
        b"OK",
    )


def test_healthz_says_ok_and_names_the_worker(app: App) -> None:
    response, body = call(app, get("/healthz"))
    assert response.status == "200 OK"
    assert response.headers == {"Content-Type": "application/json"}
    assert body == b'{"status":"ok","worker":%d,"received":0}' % PID


def test_healthz_carries_the_workers_count_of_broker_messages_as_it_is_now(
    app: App, backend: Backend
) -> None:
    backend.received = 41
    assert call(app, get("/healthz"))[1] == b'{"status":"ok","worker":%d,"received":41}' % PID
    backend.received = 42
    assert call(app, get("/healthz"))[1] == b'{"status":"ok","worker":%d,"received":42}' % PID


def test_readyz_is_200_naming_the_worker_while_the_backend_is_ready(app: App) -> None:
    response, body = call(app, get("/readyz"))
    assert response.status == "200 OK"
    assert body == b'{"status":"ready","worker":%d}' % PID


def test_readyz_is_503_with_the_backends_status_as_reason(app: App, backend: Backend) -> None:
    backend.ready = False
    backend.status = "cannot connect to broker"
    response, body = call(app, get("/readyz"))
    assert response.status == "503 Service Unavailable"
    assert response.headers == {"Content-Type": "application/json"}
    assert body == (
        b'{"status":"unavailable","reason":"cannot connect to broker","worker":%d}' % PID
    )


def test_head_probes_are_answered_like_get(app: App) -> None:
    response, body = call(app, get("/healthz", method="HEAD"))
    assert (response.status, body) == ("200 OK", b'{"status":"ok","worker":%d,"received":0}' % PID)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_400(app: App, method: str) -> None:
    status, _, body = refused(app, get("/readyz", method=method))
    assert (status, body) == (
        "400 Bad Request",
        b'{"error":"only GET health probes and websocket upgrades are served"}',
    )


@pytest.mark.parametrize("path", ["/", "/public", "/private", "/metrics", ""])
def test_a_plain_get_elsewhere_is_400_json(app: App, path: str) -> None:
    status, _, body = refused(app, get(path))
    assert (status, body) == (
        "400 Bad Request",
        b'{"error":"this endpoint only serves websocket upgrades"}',
    )


# -- refused upgrades ------------------------------------------------------------------------


def test_an_upgrade_by_post_is_405_with_allow_get(app: App, backend: Backend) -> None:
    status, headers, body = refused(app, upgrade("/public", REQUEST_METHOD="POST"))
    assert (status, headers["Allow"], body) == (
        "405 Method Not Allowed",
        "GET",
        b'{"error":"websocket upgrade must use GET"}',
    )
    assert backend.attached == []


def test_another_websocket_version_is_426_naming_13(app: App) -> None:
    status, headers, body = refused(app, upgrade("/", HTTP_SEC_WEBSOCKET_VERSION="8"))
    assert (status, headers["Sec-WebSocket-Version"], body) == (
        "426 Upgrade Required",
        "13",
        b'{"error":"Sec-WebSocket-Version must be 13"}',
    )


def test_a_bad_key_is_400(app: App) -> None:
    status, headers, body = refused(app, upgrade("/", HTTP_SEC_WEBSOCKET_KEY="c2hvcnQ="))
    assert (status, body) == (
        "400 Bad Request",
        b'{"error":"Sec-WebSocket-Key must be 16 bytes in base64"}',
    )
    assert "Allow" not in headers and "Sec-WebSocket-Version" not in headers


def test_a_foreign_origin_is_403(app: App, backend: Backend) -> None:
    status, _, body = refused(app, upgrade("/public", HTTP_ORIGIN="https://evil.example"))
    assert (status, body) == ("403 Forbidden", b'{"error":"Origin not allowed"}')
    assert backend.attached == []


def test_a_listed_origin_is_let_in(
    backend: Backend, authenticator: Authenticator, conn: socket.socket
) -> None:
    app = App(Config.from_env({"API_CORS_ORIGINS": "exchange.example"}), backend, authenticator)
    environ = upgrade("/public", conn, HTTP_ORIGIN="https://exchange.example")
    assert app(environ, Response()) is HANDED_OVER
    assert len(backend.attached) == 1


def test_an_upgrade_while_shutting_down_is_503(app: App, backend: Backend) -> None:
    backend.accepting = False
    status, _, body = refused(app, upgrade("/public"))
    assert (status, body) == ("503 Service Unavailable", b'{"error":"server is shutting down"}')
    assert backend.attached == []


def test_an_upgrade_while_full_is_503(app: App, backend: Backend) -> None:
    backend.full = True
    status, _, body = refused(app, upgrade("/public"))
    assert (status, body) == ("503 Service Unavailable", b'{"error":"too many connections"}')
    assert backend.attached == []


@pytest.mark.parametrize("path", ["/private", "/private/"])
def test_private_without_a_token_is_401_and_the_failure_counted(
    app: App, backend: Backend, path: str
) -> None:
    status, _, body = refused(app, upgrade(path))
    assert (status, body) == (
        "401 Unauthorized",
        b'{"error":"Authorization failed: missing bearer token"}',
    )
    assert backend.auth_failures == ["missing bearer token"]
    assert backend.attached == []


def test_private_with_a_forged_token_is_401_and_the_log_never_shows_it(
    app: App, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    forged = token(ed25519.Ed25519PrivateKey.generate())
    with caplog.at_level(logging.INFO, logger="ranger_py.app"):
        status, _, body = refused(app, upgrade("/private", HTTP_AUTHORIZATION=f"Bearer {forged}"))
    assert (status, body) == (
        "401 Unauthorized",
        b'{"error":"Authorization failed: invalid signature"}',
    )
    assert backend.auth_failures == ["invalid signature"]
    assert [r.getMessage() for r in caplog.records] == [
        "refused upgrade /private from 192.0.2.7: 401 Authorization failed: invalid signature"
    ]
    assert forged not in caplog.text


# -- upgrades handed over --------------------------------------------------------------------


def test_a_valid_upgrade_is_handed_to_the_backend_with_the_detached_fd(
    app: App, backend: Backend, conn: socket.socket
) -> None:
    fd = conn.fileno()
    response = Response()
    environ = upgrade("/public", conn, QUERY_STRING="stream=btcusd.trades,global.tickers&x=1")
    assert app(environ, response) is HANDED_OVER
    assert response.calls == []  # the 101 is the backend's to send, with the first frames
    assert conn.fileno() == -1  # the socket object let go of the fd, without closing it
    assert backend.attached == [
        (fd, GREETING, ANONYMOUS, "/public", ["btcusd.trades", "global.tickers"])
    ]
    assert backend.auth_failures == []


def test_private_with_a_valid_token_is_attached_with_its_uid_and_role(
    app: App, backend: Backend, conn: socket.socket, signing_key: ed25519.Ed25519PrivateKey
) -> None:
    environ = upgrade(
        "/private",
        conn,
        QUERY_STRING="stream=order&stream=trade",
        HTTP_AUTHORIZATION=f"Bearer {token(signing_key, uid='IDABC0000001', role='admin')}",
    )
    assert app(environ, Response()) is HANDED_OVER
    [(_, _, auth, path, streams)] = backend.attached
    assert (auth.uid, auth.role, path, streams) == (
        "IDABC0000001",
        "admin",
        "/private",
        ["order", "trade"],
    )
    assert auth.expires is not None  # the token's exp, for RANGER_TOKEN_EXPIRY=close


def test_a_token_elsewhere_is_optional_and_a_bad_one_leaves_the_client_anonymous(
    app: App, backend: Backend, conn: socket.socket
) -> None:
    environ = upgrade("/public", conn, HTTP_AUTHORIZATION="Bearer not-a-token")
    assert app(environ, Response()) is HANDED_OVER
    [(_, _, auth, path, _)] = backend.attached
    assert (auth, path) == (ANONYMOUS, "/public")
    assert backend.auth_failures == ["malformed token"]


def test_a_valid_token_elsewhere_authenticates(
    app: App, backend: Backend, conn: socket.socket, signing_key: ed25519.Ed25519PrivateKey
) -> None:
    environ = upgrade("/", conn, HTTP_AUTHORIZATION=f"Bearer {token(signing_key, uid='U9')}")
    assert app(environ, Response()) is HANDED_OVER
    auth, path = backend.attached[0][2:4]
    assert (auth.uid, auth.role, path) == ("U9", "member", "/")


def test_an_empty_path_upgrades_as_the_root(
    app: App, backend: Backend, conn: socket.socket
) -> None:
    assert app(upgrade("", conn), Response()) is HANDED_OVER
    assert backend.attached[0][3] == "/"


def test_close_shuts_the_backend_down_with_the_timeout(app: App, backend: Backend) -> None:
    app.close(7.5)
    assert backend.shutdowns == [7.5]
