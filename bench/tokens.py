"""RS256 tokens shaped like Barong's, for the private and idle scenarios (PROTOCOL §3).

One RSA key per benchmark run; the server under test gets its public half as
``JWT_PUBLIC_KEY`` (base64 of the PEM). Tokens are signed up front, before anything is timed,
and written one per line to a file that the load generators read.
"""

from __future__ import annotations

import base64
import secrets
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["Signer", "uid"]

_VALIDITY_S = 6 * 3600


def uid(index: int) -> str:
    """Barong-style user id: ``ID`` and ten upper-case hex digits."""
    return f"ID{index:010X}"


class Signer:
    def __init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_env = base64.b64encode(pem).decode("ascii")
        self._signed: list[str] = []
        self._now = int(time.time())

    def token(self, index: int) -> str:
        claims = {
            "iat": self._now,
            "exp": self._now + _VALIDITY_S,
            "sub": "session",
            "iss": "barong",
            "aud": ["peatio", "barong"],
            "jti": secrets.token_hex(8).upper(),
            "uid": uid(index),
            "email": f"trader{index}@example.com",
            "role": "member",
            "level": 3,
            "state": "active",
        }
        return jwt.encode(claims, self._key, algorithm="RS256")

    def tokens_file(self, path: Path, count: int) -> Path:
        """``path`` holding the tokens of users 0 .. count-1, one per line (signed once)."""
        while len(self._signed) < count:
            self._signed.append(self.token(len(self._signed)))
        path.write_text("\n".join(self._signed) + "\n", encoding="ascii")
        return path
