"""Key pairs and Barong-shaped JWTs for the integration tests (PROTOCOL §3).

``JWT_PUBLIC_KEY`` is the base64 of a PEM public key. Three key forms are produced: an RSA key
(Barong's RS256 tokens), an Ed25519 key as a standard SPKI PEM, and Rango's own form, a
``PUBLIC KEY`` PEM that wraps the raw 32-byte Ed25519 key.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = ["SigningKey", "ed25519_key", "rsa_key"]


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs tokens, and the ``JWT_PUBLIC_KEY`` value that verifies them."""

    algorithm: str
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    public_env: str

    def token(self, uid: str | None = "IDE8E2280FD1", role: str = "member", **claims: Any) -> str:
        """A token with Barong's claims; ``claims`` override or add (``None`` removes one)."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iat": now,
            "exp": now + 3600,
            "sub": "session",
            "iss": "barong",
            "aud": ["peatio", "barong"],
            "jti": secrets.token_hex(8).upper(),
            "uid": uid,
            "email": "trader@example.com",
            "role": role,
            "level": 3,
            "state": "active",
        }
        payload.update(claims)
        payload = {key: value for key, value in payload.items() if value is not None}
        return jwt.encode(payload, self.private_key, algorithm=self.algorithm)

    def bearer(self, uid: str | None = "IDE8E2280FD1", role: str = "member", **claims: Any) -> str:
        """The ``Authorization`` header value for :meth:`token`."""
        return f"Bearer {self.token(uid, role, **claims)}"


def _env(pem: bytes) -> str:
    return base64.b64encode(pem).decode("ascii")


def rsa_key() -> SigningKey:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey("RS256", private_key, _env(pem))


def ed25519_key(*, rango_form: bool = False) -> SigningKey:
    """An Ed25519 key; ``rango_form`` puts the raw 32 bytes in the PEM instead of SPKI DER."""
    private_key = ed25519.Ed25519PrivateKey.generate()
    public_key = private_key.public_key()
    if rango_form:
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        body = base64.b64encode(raw).decode("ascii")
        pem = f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n".encode("ascii")
    else:
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return SigningKey("EdDSA", private_key, _env(pem))
