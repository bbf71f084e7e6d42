"""Upgrade validation, origin rule (Rango's TestCheckSameOrigin* cases) and the 101 answer."""

from __future__ import annotations

import pytest

from ranger_py.errors import HandshakeError
from ranger_py.handshake import accept_key, check_origin, is_upgrade, switching_protocols

# RFC 6455 §1.3's worked example.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade(**extra: str) -> dict[str, str]:
    environ = {
        "REQUEST_METHOD": "GET",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "keep-alive, Upgrade",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        "HTTP_SEC_WEBSOCKET_KEY": KEY,
    }
    environ.update(extra)
    return environ


def test_valid_upgrade_gets_the_rfc_accept_value() -> None:
    assert is_upgrade(upgrade())
    assert accept_key(upgrade()) == ACCEPT
    assert switching_protocols(ACCEPT).endswith(b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n")


def test_accepted_extensions_are_answered_in_the_101() -> None:
    answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    response = switching_protocols(ACCEPT, answer)
    assert response.endswith(
        b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n"
        b"Sec-WebSocket-Extensions: " + answer.encode() + b"\r\n\r\n"
    )
    assert b"Sec-WebSocket-Extensions" not in switching_protocols(ACCEPT, None)


def test_plain_request_is_not_an_upgrade() -> None:
    assert not is_upgrade({"REQUEST_METHOD": "GET", "PATH_INFO": "/healthz"})


@pytest.mark.parametrize(
    ("environ", "status"),
    [
        (upgrade(REQUEST_METHOD="POST"), 405),
        (upgrade(HTTP_UPGRADE="h2c"), 400),
        (upgrade(HTTP_CONNECTION="close"), 400),
        (upgrade(HTTP_SEC_WEBSOCKET_VERSION="8"), 426),
        (upgrade(HTTP_SEC_WEBSOCKET_KEY="not base64!"), 400),
        (upgrade(HTTP_SEC_WEBSOCKET_KEY="c2hvcnQ="), 400),  # 5 bytes, not 16
    ],
)
def test_bad_upgrades_get_an_http_status(environ: dict[str, str], status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        accept_key(environ)
    assert info.value.status == status
    assert info.value.body.startswith(b'{"error":"')


@pytest.mark.parametrize(
    ("origin", "host", "ok"),
    [
        (None, "example.org", True),
        ("https://other.org", "example.org", False),
        ("https://example.org", "example.org", True),
        ("https://example.org", "Example.org", True),
        ("null", "example.org", False),
    ],
)
def test_same_origin_rule_without_cors_origins(origin: str | None, host: str, ok: bool) -> None:
    if ok:
        check_origin(None, origin, host)
    else:
        with pytest.raises(HandshakeError) as info:
            check_origin(None, origin, host)
        assert info.value.status == 403


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("https://other.org", False),
        ("https://example.org", True),
        ("https://Example.org", True),
        ("http://example.com", True),
        ("https://Example.com", True),
        (None, True),
    ],
)
def test_listed_origins(origin: str | None, ok: bool) -> None:
    allowed = ("example.org", "example.com")
    if ok:
        check_origin(allowed, origin, "whatever.org")
    else:
        with pytest.raises(HandshakeError):
            check_origin(allowed, origin, "whatever.org")


def test_an_origin_with_no_host_passes_only_when_any_origin_is_allowed() -> None:
    # "Origin: null" (sandboxed pages, file://) has no host; an empty list entry no longer
    # matches it, as it did in Rango.
    with pytest.raises(HandshakeError):
        check_origin(("example.org",), "null", "gw.example.org")
    check_origin(("*",), "null", "gw.example.org")
    check_origin(("*",), "https://anything.example", "gw.example.org")
