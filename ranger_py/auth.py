"""Bearer-token authentication: an ``Authorization`` header value in, an :class:`Auth` out.

This module owns everything about JWTs (PROTOCOL §3): decoding ``JWT_PUBLIC_KEY``, choosing the
one algorithm that key may verify, and checking a token's signature, ``exp``/``nbf``/``iat`` (each
with its own leeway), ``iss`` and ``aud``. It is the only importer of ``jwt`` (PyJWT). Pure apart
from reading the clock: no I/O, no logging, so a token never reaches a log line from here.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ranger_py.errors import AuthError, ConfigError

__all__ = ["ANONYMOUS", "Auth", "AuthSettings", "Authenticator"]


@dataclass(frozen=True, slots=True)
class Auth:
    """Who a connection is: ``uid`` picks its private streams, ``role`` its RBAC prefixes."""

    uid: str = ""  # "" = anonymous for private streams, even behind a valid token
    role: str = ""


ANONYMOUS: Auth = Auth()

# The key types a token can be verified with; anything else in JWT_PUBLIC_KEY is a ConfigError.
_VerifyKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class AuthSettings(Protocol):
    """The ``Config`` attributes that :meth:`Authenticator.from_config` reads."""

    @property
    def jwt_public_key(self) -> str | None: ...
    @property
    def jwt_algorithm(self) -> str | None: ...
    @property
    def jwt_issuer(self) -> str | None: ...
    @property
    def jwt_audience(self) -> Sequence[str]: ...
    @property
    def jwt_default_leeway(self) -> float: ...
    @property
    def jwt_issued_at_leeway(self) -> float | None: ...
    @property
    def jwt_expiration_leeway(self) -> float | None: ...
    @property
    def jwt_not_before_leeway(self) -> float | None: ...


_PUBLIC_KEY = "JWT_PUBLIC_KEY"
_ALGORITHM = "JWT_ALGORITHM"

# Every algorithm JWT_ALGORITHM may name. "none" and HS* are absent on purpose: with a public key
# as the HMAC secret, anyone could sign (the classic algorithm-confusion attack).
_SUPPORTED = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA")

# An EC key verifies exactly one ES* algorithm: the one built on its curve (RFC 7518 §3.4).
_EC_ALGORITHM = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")

_BEARER = "Bearer "
_NOT_CONFIGURED = "authentication is not configured"
_MISSING = "missing bearer token"

# PyJWT failures -> the reason the client may see; first match wins, so subclasses come first
# (InvalidSignatureError is a DecodeError). None of PyJWT's own messages is passed on.
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "invalid signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidIssuerError, "invalid issuer"),
    (jwt.InvalidAudienceError, "invalid audience"),
    (jwt.DecodeError, "malformed token"),
)


class Authenticator:
    """Verifies bearer tokens against the one public key given at startup.

    Everything that does not depend on the token (key, algorithm list, PyJWT options) is computed
    once here, because :meth:`authenticate` runs on every connect.
    """

    def __init__(
        self,
        public_key: str | None,
        *,
        algorithm: str | None = None,
        issuer: str | None = None,
        audience: Sequence[str] = (),
        default_leeway: float = 0,
        issued_at_leeway: float | None = None,
        expiration_leeway: float | None = None,
        not_before_leeway: float | None = None,
    ) -> None:
        """Load the key and fix the checks.

        Args:
            public_key: the raw ``JWT_PUBLIC_KEY`` text; ``None`` or ``""`` disables authentication.
            algorithm: ``JWT_ALGORITHM``; ``None`` takes the algorithm from the key type.
            issuer: ``JWT_ISSUER``; when set, ``iss`` must equal it.
            audience: ``JWT_AUDIENCE``; when non-empty, ``aud`` must name one of them.
            default_leeway: seconds of clock skew allowed for ``iat``, ``exp`` and ``nbf``.
            issued_at_leeway, expiration_leeway, not_before_leeway: per-claim overrides.

        Raises:
            ConfigError: naming ``JWT_PUBLIC_KEY``, ``JWT_ALGORITHM`` or a ``JWT_*_LEEWAY``.
        """
        algorithm = algorithm or None  # "" is unset, as every empty variable (Rango's getEnv)
        if algorithm is not None and algorithm not in _SUPPORTED:
            raise ConfigError(
                _ALGORITHM,
                f"unsupported algorithm {algorithm!r}; use one of {', '.join(_SUPPORTED)}",
            )
        self._key: _VerifyKey | None = None
        self._algorithms: list[str] = []
        if public_key:
            self._key = _load_public_key(public_key)
            self._algorithms = [_pick_algorithm(self._key, algorithm)]

        default = _leeway("JWT_DEFAULT_LEEWAY", default_leeway)
        self._iat_leeway = _leeway("JWT_ISSUED_AT_LEEWAY", issued_at_leeway, default)
        self._exp_leeway = _leeway("JWT_EXPIRATION_LEEWAY", expiration_leeway, default)
        self._nbf_leeway = _leeway("JWT_NOT_BEFORE_LEEWAY", not_before_leeway, default)

        self._issuer = issuer or None
        self._audience = list(audience) or None
        # Time claims are checked in _check_times, not by PyJWT: it has one leeway for all three and
        # we need one each (Ranger's JWT_*_LEEWAY). iss/aud are left to PyJWT, each only when
        # configured; aud verification must be off otherwise, or PyJWT refuses every token that
        # carries aud (Barong's do). sub and jti are neither required nor type-checked: unused here.
        self._jwt = jwt.PyJWT(
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_iss": self._issuer is not None,
                "verify_aud": self._audience is not None,
                "verify_sub": False,
                "verify_jti": False,
                "require": [],
            }
        )

    @classmethod
    def from_config(cls, config: AuthSettings) -> Authenticator:
        """Build from the ``jwt_*`` attributes of a ``Config``."""
        return cls(
            config.jwt_public_key,
            algorithm=config.jwt_algorithm,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
            default_leeway=config.jwt_default_leeway,
            issued_at_leeway=config.jwt_issued_at_leeway,
            expiration_leeway=config.jwt_expiration_leeway,
            not_before_leeway=config.jwt_not_before_leeway,
        )

    @property
    def enabled(self) -> bool:
        """False when ``JWT_PUBLIC_KEY`` is unset: every token is refused (PROTOCOL §3)."""
        return self._key is not None

    @property
    def algorithm(self) -> str | None:
        """The one algorithm tokens must be signed with, or None when not enabled."""
        return self._algorithms[0] if self._algorithms else None

    def authenticate(self, authorization: str | None) -> Auth:
        """Verify the ``Authorization`` header value and return who the token names.

        Args:
            authorization: the header value, or None when the request has none.

        Raises:
            AuthError: with a short reason that never contains the token. The caller decides what
                it means: 401 on ``/private``, anonymous elsewhere.
        """
        if self._key is None:
            raise AuthError(_NOT_CONFIGURED)
        token = _bearer_token(authorization)
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from None
        self._check_times(claims, time.time())
        return Auth(uid=_string_claim(claims, "uid"), role=_string_claim(claims, "role"))

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        # Boundaries as Rango (golang-jwt): valid while now <= exp, from now >= nbf and now >= iat.
        exp = _numeric_date(claims, "exp")
        if exp is not None and now > exp + self._exp_leeway:
            raise AuthError("token expired")
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and now + self._nbf_leeway < nbf:
            raise AuthError("token not yet valid")
        # Ranger refuses an iat in the future (Rango too); PyJWT would only with its shared leeway.
        iat = _numeric_date(claims, "iat")
        if iat is not None and now + self._iat_leeway < iat:
            raise AuthError("token issued in the future")


def _bearer_token(authorization: str | None) -> str:
    # Accepted as Rango: the value starts with exactly "Bearer " (case-sensitive, one space) and the
    # token is the rest, verbatim. "bearer x", "Bearer  x" (two spaces) and other schemes fail.
    if not authorization:
        raise AuthError(_MISSING)
    if not authorization.startswith(_BEARER):
        raise AuthError("authorization scheme must be Bearer")
    token = authorization[len(_BEARER) :]
    if not token:
        raise AuthError(_MISSING)
    if not token.isascii():
        # A compact JWT is ASCII; this also keeps odd code points away from PyJWT's encode().
        raise AuthError("malformed token")
    return token


def _reason(exc: jwt.PyJWTError) -> str:
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid token"


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:  # absent or null: not checked (Rango and Ranger check only what is there)
        return None
    # RFC 7519 §2 NumericDate is a JSON number; Python's json also yields NaN and Infinity, which
    # would pass any comparison the wrong way.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(f"invalid {name} claim")
    return float(value)


def _string_claim(claims: dict[str, Any], name: str) -> str:
    # A uid or role of another type (number, list, null) counts as absent instead of refusing the
    # token: the connection is then anonymous / role-less, which grants nothing. Rango would reject
    # the whole token; this is the safer reading for a gateway that must never crash on a claim.
    value = claims.get(name)
    return value if isinstance(value, str) else ""


def _leeway(variable: str, value: float | None, default: float = 0) -> float:
    if value is None:
        return default
    if value < 0 or not math.isfinite(value):
        raise ConfigError(variable, "must be a number of seconds >= 0")
    return float(value)


def _load_public_key(text: str) -> _VerifyKey:
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


def _pick_algorithm(key: _VerifyKey, configured: str | None) -> str:
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
