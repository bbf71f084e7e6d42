"""Bearer-token authentication: an ``Authorization`` header value in, an :class:`Auth` out.

This module owns the checks of a token (PROTOCOL §3): its signature with the key and algorithm that
:mod:`ranger_py.keys` read from ``JWT_PUBLIC_KEY``, ``exp``/``nbf``/``iat`` (each with its own
leeway), ``iss`` and ``aud``. It is the server's only importer of ``jwt`` (PyJWT; the
``ranger-py token`` tool signs with it too). Pure apart from reading the clock: no I/O, no
logging, so a token never reaches a log line from here.

The same checks verify the token of an ``auth`` event (:meth:`Authenticator.renew`), which
must continue the connection's identity and push its expiry later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from ranger_py.errors import AuthError
from ranger_py.keys import VerifyKey, load_verify_key

__all__ = ["ANONYMOUS", "Auth", "AuthSettings", "Authenticator"]


@dataclass(frozen=True, slots=True)
class Auth:
    """Who a connection is: ``uid`` picks its private streams, ``role`` its RBAC prefixes.

    ``expires`` is when the token stops being accepted: its ``exp`` plus the expiration leeway,
    in ``time.time()`` seconds; None when it has no ``exp`` (and for anonymous connections).
    """

    uid: str = ""  # "" = anonymous for private streams, even behind a valid token
    role: str = ""
    expires: float | None = None


ANONYMOUS: Auth = Auth()


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
            The leeways are taken as ``config.Config`` checked them (whole seconds, >= 0).

        Raises:
            ConfigError: naming ``JWT_PUBLIC_KEY`` or ``JWT_ALGORITHM``.
        """
        self._key: VerifyKey | None = None
        self._algorithms: list[str] = []
        loaded = load_verify_key(public_key, algorithm)
        if loaded is not None:
            self._key, algorithm = loaded
            self._algorithms = [algorithm]

        default = float(default_leeway)
        self._iat_leeway = _leeway(issued_at_leeway, default)
        self._exp_leeway = _leeway(expiration_leeway, default)
        self._nbf_leeway = _leeway(not_before_leeway, default)

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
        return self.verify(_bearer_token(authorization))

    def verify(self, token: str) -> Auth:
        """Verify a bare token (an ``auth`` event's) exactly as :meth:`authenticate` does.

        Raises:
            AuthError: as :meth:`authenticate`.
        """
        if self._key is None:
            raise AuthError(_NOT_CONFIGURED)
        if not token:
            raise AuthError(_MISSING)
        if not token.isascii():
            # A compact JWT is ASCII; this also keeps odd code points away from PyJWT's encode().
            raise AuthError("malformed token")
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
        expires = self._check_times(claims, time.time())
        uid, role = _string_claim(claims, "uid"), _string_claim(claims, "role")
        return Auth(uid=uid, role=role, expires=expires)

    def renew(self, current: Auth, token: str) -> Auth:
        """Verify the token of an ``auth`` event for a connection that holds ``current``.

        It must pass :meth:`verify`, name the same ``uid`` and ``role`` (subscriptions were
        allowed for that role: a new one means a new connection), and expire later than
        ``current``. A token without ``exp`` only renews one without ``exp``: a renewal must
        not turn a token that ends into one that never does.

        Raises:
            AuthError: with the reason; ``current`` stays in force.
        """
        renewed = self.verify(token)
        if renewed.uid != current.uid:
            raise AuthError("uid does not match the connection")
        if renewed.role != current.role:
            raise AuthError("role does not match the connection")
        if renewed.expires is None:
            if current.expires is not None:
                raise AuthError("missing exp claim")
        elif current.expires is None or renewed.expires <= current.expires:
            raise AuthError("token does not expire later than the current one")
        return renewed

    def _check_times(self, claims: dict[str, Any], now: float) -> float | None:
        """Check exp, nbf and iat; return when the token stops being accepted (None: never)."""
        # Boundaries as Rango (golang-jwt): valid while now <= exp, from now >= nbf and now >= iat.
        exp = _numeric_date(claims, "exp")
        expires = None if exp is None else exp + self._exp_leeway
        if expires is not None and now > expires:
            raise AuthError("token expired")
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and now + self._nbf_leeway < nbf:
            raise AuthError("token not yet valid")
        # Ranger refuses an iat in the future (Rango too); PyJWT would only with its shared leeway.
        iat = _numeric_date(claims, "iat")
        if iat is not None and now + self._iat_leeway < iat:
            raise AuthError("token issued in the future")
        return expires


def _bearer_token(authorization: str | None) -> str:
    # Accepted as Rango: the value starts with exactly "Bearer " (case-sensitive, one space) and the
    # token is the rest, verbatim. "bearer x", "Bearer  x" (two spaces) and other schemes fail.
    if not authorization:
        raise AuthError(_MISSING)
    if not authorization.startswith(_BEARER):
        raise AuthError("authorization scheme must be Bearer")
    return authorization[len(_BEARER) :]


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


def _leeway(value: float | None, default: float) -> float:
    return default if value is None else float(value)
