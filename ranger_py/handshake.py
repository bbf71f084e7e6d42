"""The HTTP side of a websocket upgrade (RFC 6455 §4.2), checked on a WSGI environ. Pure.

gunicorn has already parsed the request; what is left is to decide whether it is a valid
upgrade, which origin may make it (Rango's ``API_CORS_ORIGINS`` rule, PROTOCOL §1), and what
to answer. Every refusal is a ``HandshakeError`` carrying its HTTP status.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from collections.abc import Mapping
from urllib.parse import urlsplit

from ranger_py.errors import HandshakeError
from ranger_py.wsproto_adapter import accept_token

__all__ = ["accept_key", "check_origin", "is_upgrade", "switching_protocols"]


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


def is_upgrade(environ: Mapping[str, object]) -> bool:
    """Whether the request asks for a websocket at all (then it never gets plain HTTP)."""
    return "HTTP_UPGRADE" in environ or "HTTP_SEC_WEBSOCKET_KEY" in environ


def accept_key(environ: Mapping[str, object]) -> bytes:
    """Validate the upgrade request and return its ``Sec-WebSocket-Accept`` value."""
    if environ.get("REQUEST_METHOD") != "GET":
        raise HandshakeError(405, "websocket upgrade must use GET")
    if "websocket" not in _tokens(str(environ.get("HTTP_UPGRADE", ""))):
        raise HandshakeError(400, "Upgrade header must be websocket")
    if "upgrade" not in _tokens(str(environ.get("HTTP_CONNECTION", ""))):
        raise HandshakeError(400, "Connection header must include Upgrade")
    if str(environ.get("HTTP_SEC_WEBSOCKET_VERSION", "")).strip() != "13":
        # §4.4: say which version we speak (the 426 carries Sec-WebSocket-Version: 13).
        raise HandshakeError(426, "Sec-WebSocket-Version must be 13")
    key = str(environ.get("HTTP_SEC_WEBSOCKET_KEY", "")).strip()
    try:
        valid = len(b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    return accept_token(key.encode("ascii"))


def check_origin(allowed: tuple[str, ...] | None, origin: str | None, host: str) -> None:
    """Rango's origin rule: no ``Origin`` passes; else its host must be ``Host`` or listed.

    ``allowed`` is ``API_CORS_ORIGINS`` as the configuration parsed it (hosts, or ``"*"``).
    """
    if origin is None:
        return
    try:
        origin_host = urlsplit(origin).netloc.lower()
    except ValueError:
        raise HandshakeError(403, "Origin not allowed") from None
    if allowed is None:
        ok = bool(origin_host) and origin_host == host.lower()
    else:
        # "*" is ANY_ORIGIN of the configuration; "" is never listed, so "Origin: null" (no
        # host) only passes with "*".
        ok = "*" in allowed or (bool(origin_host) and origin_host in allowed)
    if not ok:
        raise HandshakeError(403, "Origin not allowed")


def switching_protocols(accept: bytes, extensions: str | None = None) -> bytes:
    """The 101 response that completes the handshake, with the accepted extensions if any
    (ranger_py.compression's answer, ASCII by construction)."""
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n"
    )
    if extensions:
        head += b"Sec-WebSocket-Extensions: " + extensions.encode("ascii") + b"\r\n"
    return head + b"\r\n"
