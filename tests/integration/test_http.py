"""Plain HTTP and the handshake (PROTOCOL §2, server contract): probes, 400s, 401s, 403s."""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import InvalidStatus

from .harness import Connect, Server, ServerPool, wait_until
from .tokens import SigningKey, ed25519_key
from .wsclient import Client, subscribed


def _json_error(body: bytes) -> str:
    document = json.loads(body)
    assert isinstance(document, dict) and set(document) == {"error"}, document
    reason = document["error"]
    assert isinstance(reason, str) and reason
    return reason


def test_healthcheck_is_rangers_probe(server: Server) -> None:
    response = server.http("/healthcheck")
    assert response.status == 200
    assert response.body == b"OK"


def test_healthz_and_readyz_answer_json(server: Server) -> None:
    for path in ("/healthz", "/readyz"):
        response = server.http(path)
        assert response.status == 200, (path, response)
        assert response.headers["content-type"].startswith("application/json")
        json.loads(response.body)


@pytest.mark.parametrize("path", ["/", "/public", "/private", "/metrics", "/nope?x=1"])
def test_plain_get_elsewhere_is_400_with_a_reason(server: Server, path: str) -> None:
    response = server.http(path)
    assert response.status == 400
    _json_error(response.body)


def test_post_is_400(server: Server) -> None:
    response = server.http("/healthcheck", method="POST")
    assert response.status == 400
    _json_error(response.body)


def _refused(server: Server, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as refused:
        Client(server.url(path), headers=headers)
    response = refused.value.response
    return response.status_code, bytes(response.body or b"")


@pytest.mark.parametrize("path", ["/private", "/private/"])
def test_private_without_token_is_401_before_upgrade(server: Server, path: str) -> None:
    status, body = _refused(server, path, {})
    assert status == 401
    _json_error(body)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer garbage",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer eyJhbGciOiJub25lIn0.eyJ1aWQiOiJJRDEifQ.",
    ],
)
def test_private_with_bad_header_is_401(server: Server, authorization: str) -> None:
    status, body = _refused(server, "/private", {"Authorization": authorization})
    assert status == 401
    _json_error(body)


def test_private_with_expired_or_foreign_token_is_401_and_token_not_logged(
    server: Server, rsa: SigningKey
) -> None:
    expired = rsa.token(exp=1_000_000_000, iat=999_999_000)
    foreign = ed25519_key().token()
    offset = server.log_size()
    for token in (expired, foreign):
        status, body = _refused(server, "/private", {"Authorization": f"Bearer {token}"})
        assert status == 401
        _json_error(body)
    log = server.log_text(offset)
    assert expired not in log and foreign not in log  # PROTOCOL §3: a token is never logged


def test_private_with_valid_token_upgrades(
    server: Server, rsa: SigningKey, connect: Connect
) -> None:
    client = connect(server, "/private", headers={"Authorization": rsa.bearer()})
    assert client.recv() == subscribed()


def test_bad_token_on_public_path_connects_anonymously(server: Server, connect: Connect) -> None:
    client = connect(server, "/public", headers={"Authorization": "Bearer garbage"})
    assert client.recv() == subscribed()
    assert client.subscribe("order") == subscribed()


def test_foreign_origin_is_403(server: Server) -> None:
    status, _ = _refused(server, "/public", {"Origin": "https://evil.example"})
    assert status == 403


def test_same_origin_is_accepted(server: Server, connect: Connect) -> None:
    client = connect(server, "/public", headers={"Origin": f"http://127.0.0.1:{server.port}"})
    assert client.recv() == subscribed()


def test_bad_websocket_version_is_refused_with_the_version_we_speak(server: Server) -> None:
    response = server.http(
        "/public",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "8",
        },
    )
    # The contract says 400; RFC 6455 §4.4 suggests 426. Either way the version header is a MUST.
    assert response.status in {400, 426}
    assert response.headers["sec-websocket-version"] == "13"
    _json_error(response.body)


def test_bad_websocket_key_is_400(server: Server) -> None:
    response = server.http(
        "/public",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "not base64!",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert response.status == 400
    _json_error(response.body)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://www.example.com", True),
        ("http://WWW.Example.com", True),  # scheme ignored, host compared case-insensitively
        ("https://example.org", True),  # a bare entry is a host, kept verbatim
        ("https://example.org:8443", False),
        ("https://evil.example", False),
        ("null", False),
    ],
)
def test_api_cors_origins(pool: ServerPool, connect: Connect, origin: str, allowed: bool) -> None:
    server = pool.shared({"API_CORS_ORIGINS": " https://www.example.com/app , example.org"})
    if allowed:
        assert connect(server, "/public", headers={"Origin": origin}).recv() == subscribed()
    else:
        assert _refused(server, "/public", {"Origin": origin})[0] == 403
    # No Origin header (not a browser) is always allowed.
    assert connect(server, "/public").recv() == subscribed()


def test_connections_over_the_limit_get_503(pool: ServerPool, connect: Connect) -> None:
    server = pool.shared({"RANGER_MAX_CONNECTIONS": "2"})
    first = connect(server)
    second = connect(server)
    assert first.recv() == subscribed() and second.recv() == subscribed()
    status, body = _refused(server, "/public", {})
    assert status == 503
    _json_error(body)
    first.close()
    # The slot is given back once the server has seen the close.
    wait_until(lambda: _accepts(server, connect), timeout=5, what="a connection after one closed")


def _accepts(server: Server, connect: Connect) -> bool:
    try:
        client = connect(server)
    except InvalidStatus:
        return False
    return client.recv() == subscribed()
