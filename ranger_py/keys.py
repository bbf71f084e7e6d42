"""``JWT_PUBLIC_KEY`` and ``JWT_ALGORITHM``: the key tokens are verified with, and its algorithm.

Separate from :mod:`ranger_py.auth` so that the gunicorn master and ``python -m ranger_py.config``
can check the key before anything listens, with ``cryptography`` alone: importing PyJWT there would
import its JWKS client, which takes names from ``ssl`` before gevent patches it in each worker.
Pure: text in, a key object or a ``ConfigError`` naming the variable out.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ranger_py.errors import ConfigError
from ranger_py.jwt_algorithms import JWT_ALGORITHMS

__all__ = ["SUPPORTED_ALGORITHMS", "VerifyKey", "load_verify_key"]

# The key types a token can be verified with; anything else in JWT_PUBLIC_KEY is a ConfigError.
VerifyKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_PUBLIC_KEY = "JWT_PUBLIC_KEY"
_ALGORITHM = "JWT_ALGORITHM"

# The one list (ranger_py.jwt_algorithms): JWT_ALGORITHM names one, a key verifies no other.
SUPPORTED_ALGORITHMS = JWT_ALGORITHMS

# An EC key verifies exactly one ES* algorithm: the one built on its curve (RFC 7518 §3.4).
_EC_ALGORITHM = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def load_verify_key(
    public_key: str | None, algorithm: str | None = None
) -> tuple[VerifyKey, str] | None:
    """Read ``JWT_PUBLIC_KEY`` and settle the one algorithm tokens must use.

    Returns ``None`` when no key is set (authentication off), else the key and the algorithm:
    ``JWT_ALGORITHM`` if it fits the key, the key type's own otherwise.

    Raises:
        ConfigError: naming ``JWT_PUBLIC_KEY`` or ``JWT_ALGORITHM``; never quoting the key.
    """
    algorithm = algorithm or None  # "" is unset, as every empty variable (Rango's getEnv)
    if algorithm is not None and algorithm not in SUPPORTED_ALGORITHMS:
        raise ConfigError(
            _ALGORITHM,
            f"unsupported algorithm {algorithm!r}; use one of {', '.join(SUPPORTED_ALGORITHMS)}",
        )
    if not public_key:
        return None
    key = _load_public_key(public_key)
    return key, _pick_algorithm(key, algorithm)


def _load_public_key(text: str) -> VerifyKey:
    """Decode ``JWT_PUBLIC_KEY``: base64 (either alphabet, padding optional) of a PEM public key."""
    compact = _WHITESPACE.sub("", text)  # `base64` wraps at 76 columns; env files add newlines
    if compact.startswith("-----BEGIN"):
        raise ConfigError(_PUBLIC_KEY, "must be the base64 of the PEM, not the PEM itself")
    standard = compact.rstrip("=").translate(_URLSAFE_TO_STANDARD)
    try:
        pem = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(_PUBLIC_KEY, "is not valid base64") from None
    block = _PEM_BLOCK.search(pem)
    if block is None:
        raise ConfigError(_PUBLIC_KEY, "is base64 but does not decode to a PEM block")
    label = block.group(1).decode()
    if "PRIVATE KEY" in label:
        raise ConfigError(_PUBLIC_KEY, f"holds a {label}; it must be the public key")

    # Rango's own form (openware/pkg SavePublicKey): a "PUBLIC KEY" block whose body is the raw
    # 32-byte Ed25519 key rather than SPKI DER (which is never 32 bytes long).
    if label == "PUBLIC KEY":
        try:
            der = base64.b64decode(_WHITESPACE.sub("", block.group(2).decode()), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        if len(der) == 32:
            try:
                return ed25519.Ed25519PublicKey.from_public_bytes(der)
            except ValueError:
                raise ConfigError(_PUBLIC_KEY, "is not a valid raw Ed25519 public key") from None

    try:
        # Handles SPKI "PUBLIC KEY" (RSA, EC, Ed25519, ...) and PKCS#1 "RSA PUBLIC KEY".
        key = serialization.load_pem_public_key(block.group(0))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(_PUBLIC_KEY, f"its {label} block is not a readable public key") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ConfigError(
            _PUBLIC_KEY, f"{type(key).__name__} is not supported (use an RSA, EC or Ed25519 key)"
        )
    return key


def _pick_algorithm(key: VerifyKey, configured: str | None) -> str:
    """The algorithm tokens must use: JWT_ALGORITHM if it fits the key, else the key's own."""
    fitting: tuple[str, ...]
    if isinstance(key, rsa.RSAPublicKey):
        kind, fitting = "RSA", ("RS256", "RS384", "RS512")
    elif isinstance(key, ed25519.Ed25519PublicKey):
        kind, fitting = "Ed25519", ("EdDSA",)
    else:
        kind = f"EC {key.curve.name}"
        if key.curve.name not in _EC_ALGORITHM:
            raise ConfigError(_PUBLIC_KEY, f"{kind} keys are not supported (use P-256/384/521)")
        fitting = (_EC_ALGORITHM[key.curve.name],)
    if configured is None:
        return fitting[0]
    if configured not in fitting:
        raise ConfigError(
            _ALGORITHM,
            f"{configured} does not fit the {kind} key in {_PUBLIC_KEY}: use {fitting[0]}",
        )
    return configured
