"""Tests for ranger_py.auth: key loading, algorithm choice, token checks (PROTOCOL §3).

Keys are generated here with cryptography; tokens are signed with PyJWT, or forged by hand where
PyJWT refuses to build them (alg none, HS256 keyed with a public key).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from ranger_py.auth import ANONYMOUS, Auth, Authenticator
from ranger_py.errors import AuthError, ConfigError

PEM = serialization.Encoding.PEM
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
PKCS1 = serialization.PublicFormat.PKCS1


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def env_key(public_key: PublicKeyTypes, fmt: serialization.PublicFormat = SPKI) -> str:
    """JWT_PUBLIC_KEY as operators set it: base64 of the PEM."""
    return b64(pem_of(public_key, fmt))


def rango_env_key(public_key: ed25519.Ed25519PublicKey) -> str:
    """Rango's form (openware/pkg SavePublicKey): a PUBLIC KEY PEM around the raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64(f"-----BEGIN PUBLIC KEY-----\n{b64(raw)}\n-----END PUBLIC KEY-----\n".encode())


def barong_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iat": now,
        "exp": now + 3600,
        "sub": "session",
        "iss": "barong",
        "aud": ["peatio", "barong"],
        "jti": "1F2E3D4C5B6A",
        "uid": "IDABC0000001",
        "email": "admin@barong.io",
        "role": "admin",
        "level": 3,
        "state": "active",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(key: PrivateKeyTypes, algorithm: str, **overrides: Any) -> str:
    return jwt.encode(barong_claims(**overrides), key, algorithm=algorithm)  # type: ignore[arg-type]


def forge(header: dict[str, Any], claims: dict[str, Any], signer: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(signer(signing_input.encode()))}"


def hs256(secret: bytes) -> str:
    """A token signed HS256 with ``secret``: algorithm confusion when the secret is a public key."""
    return forge(
        {"alg": "HS256", "typ": "JWT"},
        barong_claims(uid="ATTACKER"),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )


def unsigned(alg: str = "none") -> str:
    return forge({"alg": alg, "typ": "JWT"}, barong_claims(uid="ATTACKER"), lambda _: b"")


def pem_of(public_key: PublicKeyTypes, fmt: serialization.PublicFormat = SPKI) -> bytes:
    return public_key.public_bytes(PEM, fmt)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def refused(authenticator: Authenticator, header: str | None) -> str:
    with pytest.raises(AuthError) as info:
        authenticator.authenticate(header)
    return info.value.reason


@pytest.fixture(scope="module")
def rs256(rsa_key: rsa.RSAPrivateKey) -> Authenticator:
    return Authenticator(env_key(rsa_key.public_key()))


# --- valid tokens, each key form ---------------------------------------------------------------


def test_rs256_barong_token(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    # No JWT_AUDIENCE: the token's aud must not make PyJWT refuse it (PyJWT checks aud whenever
    # the token has one, unless told not to).
    exp = int(time.time()) + 3600
    auth = rs256.authenticate(bearer(sign(rsa_key, "RS256", exp=exp)))
    assert auth == Auth(uid="IDABC0000001", role="admin", expires=exp)


def test_rs256_with_pkcs1_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator(env_key(rsa_key.public_key(), PKCS1))
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS256"))).uid == "IDABC0000001"


def test_eddsa_with_spki_key(ed_key: ed25519.Ed25519PrivateKey) -> None:
    authenticator = Authenticator(env_key(ed_key.public_key()))
    assert authenticator.authenticate(bearer(sign(ed_key, "EdDSA", uid="U1"))).uid == "U1"
    for token in (hs256(pem_of(ed_key.public_key())), unsigned()):
        assert refused(authenticator, bearer(token)) == "algorithm not allowed"


def test_eddsa_with_rango_raw_key_pem(ed_key: ed25519.Ed25519PrivateKey) -> None:
    env = rango_env_key(ed_key.public_key())
    authenticator = Authenticator(env)
    token = sign(ed_key, "EdDSA", uid="U2", role="trader", exp=None)
    assert authenticator.authenticate(bearer(token)) == Auth(uid="U2", role="trader")
    for token in (hs256(base64.b64decode(env)), unsigned()):
        assert refused(authenticator, bearer(token)) == "algorithm not allowed"


def test_es256(ec_key: ec.EllipticCurvePrivateKey) -> None:
    authenticator = Authenticator(env_key(ec_key.public_key()))
    assert authenticator.authenticate(bearer(sign(ec_key, "ES256"))).uid == "IDABC0000001"
    for token in (hs256(pem_of(ec_key.public_key())), unsigned()):
        assert refused(authenticator, bearer(token)) == "algorithm not allowed"


def test_es384_follows_the_curve(ec_key: ec.EllipticCurvePrivateKey) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    authenticator = Authenticator(env_key(key.public_key()))
    assert authenticator.authenticate(bearer(sign(key, "ES384"))).role == "admin"
    # ES256 is the P-256 algorithm: refused for what it is, whatever key signed it.
    assert refused(authenticator, bearer(sign(ec_key, "ES256"))) == "algorithm not allowed"


# --- JWT_PUBLIC_KEY encodings ------------------------------------------------------------------


def test_urlsafe_base64_without_padding(ed_key: ed25519.Ed25519PrivateKey) -> None:
    pem = ed_key.public_key().public_bytes(PEM, SPKI)
    text = base64.urlsafe_b64encode(pem).rstrip(b"=").decode()
    assert len(pem) % 3 != 0  # so padding really was stripped
    authenticator = Authenticator(text)
    assert authenticator.authenticate(bearer(sign(ed_key, "EdDSA"))).uid == "IDABC0000001"


def test_urlsafe_alphabet_and_leading_text(rsa_key: rsa.RSAPrivateKey) -> None:
    # "???>>>" encodes to "Pz8/Pj4+", so the url-safe form surely holds "_" and "-". Text before
    # the block is skipped, as Go's pem.Decode does.
    pem = b"???>>>\n" + rsa_key.public_key().public_bytes(PEM, SPKI)
    text = base64.urlsafe_b64encode(pem).decode()
    assert text.startswith("Pz8_Pj4-")
    authenticator = Authenticator(text)
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS256"))).uid == "IDABC0000001"


def test_wrapped_base64_with_surrounding_whitespace(rsa_key: rsa.RSAPrivateKey) -> None:
    text = base64.encodebytes(rsa_key.public_key().public_bytes(PEM, SPKI)).decode()
    assert "\n" in text.strip()  # wrapped at 76 columns, as `base64` prints it
    authenticator = Authenticator(f"  \n{text}\n ")
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS256"))).uid == "IDABC0000001"


def test_unset_key_disables_authentication(rsa_key: rsa.RSAPrivateKey) -> None:
    for value in (None, ""):
        authenticator = Authenticator(value)
        assert not authenticator.enabled
        for token in (sign(rsa_key, "RS256"), unsigned()):
            assert refused(authenticator, bearer(token)) == "authentication is not configured"


def test_enabled(rs256: Authenticator) -> None:
    assert rs256.enabled


@pytest.mark.parametrize(
    "value",
    [
        "%%% not base64 %%%",
        "QUJD" + "A",  # length 5 mod 4 == 1: cannot be base64
        b64(b"just some text, no PEM here"),
        b64(b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"),
        b64(b"-----BEGIN CERTIFICATE-----\nbm90IGEga2V5\n-----END CERTIFICATE-----\n"),
        "   \n ",
    ],
)
def test_unreadable_key_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Authenticator(value)
    assert info.value.variable == "JWT_PUBLIC_KEY"


def test_bare_pem_is_refused_with_a_hint(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError) as info:
        Authenticator(rsa_key.public_key().public_bytes(PEM, SPKI).decode())
    assert info.value.variable == "JWT_PUBLIC_KEY"
    assert "base64" in info.value.problem


def _private_pems(
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> list[bytes]:
    none = serialization.NoEncryption()
    raw_seed = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, none
    )
    return [
        rsa_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, none),
        rsa_key.private_bytes(PEM, serialization.PrivateFormat.TraditionalOpenSSL, none),
        ec_key.private_bytes(PEM, serialization.PrivateFormat.TraditionalOpenSSL, none),
        ed_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, none),
        # Rango's private form: PRIVATE KEY around the 32-byte seed.
        f"-----BEGIN PRIVATE KEY-----\n{b64(raw_seed)}\n-----END PRIVATE KEY-----\n".encode(),
    ]


def test_private_key_is_refused(
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    for pem in _private_pems(rsa_key, ec_key, ed_key):
        with pytest.raises(ConfigError) as info:
            Authenticator(b64(pem))
        assert info.value.variable == "JWT_PUBLIC_KEY"
        assert "must be the public key" in info.value.problem


@pytest.mark.parametrize(
    "public_key",
    [
        pytest.param(lambda: ed448.Ed448PrivateKey.generate().public_key(), id="ed448"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()).public_key(), id="secp256k1"),
    ],
)
def test_unsupported_key_types(public_key: Callable[[], PublicKeyTypes]) -> None:
    with pytest.raises(ConfigError) as info:
        Authenticator(env_key(public_key()))
    assert info.value.variable == "JWT_PUBLIC_KEY"


# --- JWT_ALGORITHM -----------------------------------------------------------------------------


def test_algorithm_restriction(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator(env_key(rsa_key.public_key()), algorithm="RS512")
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS512"))).uid == "IDABC0000001"
    for algorithm in ("RS256", "RS384", "PS512"):
        token = sign(rsa_key, algorithm)
        assert refused(authenticator, bearer(token)) == "algorithm not allowed", algorithm


@pytest.mark.parametrize("algorithm", ["RS384", "RS512", "PS256"])
def test_default_rsa_algorithm_is_rs256_only(
    rs256: Authenticator, rsa_key: rsa.RSAPrivateKey, algorithm: str
) -> None:
    assert refused(rs256, bearer(sign(rsa_key, algorithm))) == "algorithm not allowed"


@pytest.mark.parametrize(
    ("algorithm", "key"),
    [("EdDSA", "rsa"), ("ES256", "rsa"), ("RS256", "ed"), ("ES384", "ec"), ("RS256", "ec")],
)
def test_algorithm_must_fit_the_key(
    algorithm: str,
    key: str,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    keys: dict[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey]
    keys = {"rsa": rsa_key, "ed": ed_key, "ec": ec_key}
    private = keys[key]
    with pytest.raises(ConfigError) as info:
        Authenticator(env_key(private.public_key()), algorithm=algorithm)
    assert info.value.variable == "JWT_ALGORITHM"


@pytest.mark.parametrize("algorithm", ["none", "HS256", "HS512", "rs256", "PS256"])
def test_unsupported_algorithm(algorithm: str, rsa_key: rsa.RSAPrivateKey) -> None:
    for key in (env_key(rsa_key.public_key()), None):
        with pytest.raises(ConfigError) as info:
            Authenticator(key, algorithm=algorithm)
        assert info.value.variable == "JWT_ALGORITHM"


# --- signature and algorithm attacks ------------------------------------------------------------


def test_tampered_signature(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    head, body, signature = sign(rsa_key, "RS256").split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert refused(rs256, bearer(f"{head}.{body}.{flipped}")) == "invalid signature"


def test_tampered_payload(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    head, _, signature = sign(rsa_key, "RS256").split(".")
    _, body, _ = sign(rsa_key, "RS256", uid="SOMEONE_ELSE").split(".")
    assert refused(rs256, bearer(f"{head}.{body}.{signature}")) == "invalid signature"


def test_wrong_key(rs256: Authenticator, other_rsa_key: rsa.RSAPrivateKey) -> None:
    assert refused(rs256, bearer(sign(other_rsa_key, "RS256"))) == "invalid signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none(rs256: Authenticator, alg: str) -> None:
    assert refused(rs256, bearer(unsigned(alg))) == "algorithm not allowed"


def test_missing_alg(rs256: Authenticator) -> None:
    token = forge({"typ": "JWT"}, barong_claims(), lambda _: b"x")
    assert refused(rs256, bearer(token)) == "algorithm not allowed"


@pytest.mark.parametrize("fmt", [SPKI, PKCS1])
def test_hs256_keyed_with_the_public_key(
    rsa_key: rsa.RSAPrivateKey, fmt: serialization.PublicFormat
) -> None:
    # Algorithm confusion: the attacker signs HS256 using the (public) PEM bytes as the secret.
    authenticator = Authenticator(env_key(rsa_key.public_key(), fmt))
    token = hs256(pem_of(rsa_key.public_key(), fmt))
    assert refused(authenticator, bearer(token)) == "algorithm not allowed"


def test_rs256_token_against_ed25519_key(
    ed_key: ed25519.Ed25519PrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    for env in (env_key(ed_key.public_key()), rango_env_key(ed_key.public_key())):
        authenticator = Authenticator(env)
        assert refused(authenticator, bearer(sign(rsa_key, "RS256"))) == "algorithm not allowed"


def test_eddsa_token_against_rsa_key(
    rs256: Authenticator, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    assert refused(rs256, bearer(sign(ed_key, "EdDSA"))) == "algorithm not allowed"


# --- time claims and leeways ---------------------------------------------------------------------


def test_expired(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, "RS256", exp=int(time.time()) - 30)
    assert refused(rs256, bearer(token)) == "token expired"


def test_not_yet_valid(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, "RS256", nbf=int(time.time()) + 30)
    assert refused(rs256, bearer(token)) == "token not yet valid"


def test_issued_in_the_future(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    # Ranger's jwt_authenticator_spec: iat now+10 fails, iat now-1 passes.
    now = int(time.time())
    assert refused(rs256, bearer(sign(rsa_key, "RS256", iat=now + 10))) == (
        "token issued in the future"
    )
    assert rs256.authenticate(bearer(sign(rsa_key, "RS256", iat=now - 1))).uid == "IDABC0000001"


def test_time_claims_are_optional(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, "RS256", iat=None, exp=None, nbf=None, sub=None, jti=None)
    assert rs256.authenticate(bearer(token)).uid == "IDABC0000001"


def test_specific_leeways(rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    key = env_key(rsa_key.public_key())
    iat_late = bearer(sign(rsa_key, "RS256", iat=now + 30))
    expired = bearer(sign(rsa_key, "RS256", exp=now - 30))
    early = bearer(sign(rsa_key, "RS256", nbf=now + 30))

    lenient = Authenticator(key, issued_at_leeway=60, expiration_leeway=60, not_before_leeway=60)
    for header in (iat_late, expired, early):
        assert lenient.authenticate(header).uid == "IDABC0000001"

    # Each leeway applies to its own claim only.
    only_iat = Authenticator(key, issued_at_leeway=60)
    assert only_iat.authenticate(iat_late).uid == "IDABC0000001"
    assert refused(only_iat, expired) == "token expired"
    assert refused(only_iat, early) == "token not yet valid"


def test_default_leeway_and_overrides(rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    key = env_key(rsa_key.public_key())
    iat_late = bearer(sign(rsa_key, "RS256", iat=now + 30))
    expired = bearer(sign(rsa_key, "RS256", exp=now - 30))

    default = Authenticator(key, default_leeway=60)
    assert default.authenticate(iat_late).uid == "IDABC0000001"
    assert default.authenticate(expired).uid == "IDABC0000001"

    # A specific leeway replaces the default, even when it is smaller.
    strict_iat = Authenticator(key, default_leeway=60, issued_at_leeway=0)
    assert refused(strict_iat, iat_late) == "token issued in the future"
    assert strict_iat.authenticate(expired).uid == "IDABC0000001"


@pytest.mark.parametrize("value", ["1700000000", True, [1], {"n": 1}, float("nan"), float("inf")])
def test_time_claim_of_the_wrong_type(
    rs256: Authenticator, rsa_key: rsa.RSAPrivateKey, value: object
) -> None:
    assert refused(rs256, bearer(sign(rsa_key, "RS256", exp=value))) == "invalid exp claim"


# --- issuer and audience --------------------------------------------------------------------------


def test_issuer(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator(env_key(rsa_key.public_key()), issuer="qux")
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS256", iss="qux"))).uid
    assert refused(authenticator, bearer(sign(rsa_key, "RS256", iss="hacker"))) == (
        "invalid issuer"
    )
    assert refused(authenticator, bearer(sign(rsa_key, "RS256", iss=None))) == ("missing iss claim")


def test_issuer_unchecked_when_unset(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    assert rs256.authenticate(bearer(sign(rsa_key, "RS256", iss="anyone"))).uid


def test_audience(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator(env_key(rsa_key.public_key()), audience=("foo", "bar"))
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS256", aud=["bar"]))).uid
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS256", aud="foo"))).uid
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS256", aud=["x", "foo"]))).uid
    for aud in (["baz"], "baz", [1]):
        assert refused(authenticator, bearer(sign(rsa_key, "RS256", aud=aud))) == (
            "invalid audience"
        )
    assert refused(authenticator, bearer(sign(rsa_key, "RS256", aud=None))) == ("missing aud claim")


def test_string_audience_when_unset(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    assert rs256.authenticate(bearer(sign(rsa_key, "RS256", aud="peatio"))).uid


# --- the Authorization header -------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer "])
def test_missing_bearer_token(rs256: Authenticator, header: str | None) -> None:
    assert refused(rs256, header) == "missing bearer token"


@pytest.mark.parametrize(
    "header",
    ["Bearer garbage", "Bearer a.b.c", "Bearer ..", "Bearer é.é.é", "Bearer W10.e30.e30"],
)
def test_malformed_token(rs256: Authenticator, header: str) -> None:
    assert refused(rs256, header) == "malformed token"


def test_other_schemes(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, "RS256")
    for header in ("Basic xyz", f"bearer {token}", f"BEARER {token}", token, f"Token {token}"):
        assert refused(rs256, header) == "authorization scheme must be Bearer"


def test_token_is_taken_verbatim(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    # As Rango: exactly one space, nothing trimmed.
    token = sign(rsa_key, "RS256")
    assert refused(rs256, f"Bearer  {token}") == "malformed token"
    assert refused(rs256, f"Bearer {token} ") == "malformed token"


# --- identity -------------------------------------------------------------------------------------


def test_token_without_uid_is_anonymous(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    # Without exp too, so that nothing is left to tell it from a connection with no token.
    token = sign(rsa_key, "RS256", uid=None, role=None, exp=None)
    assert rs256.authenticate(bearer(token)) == ANONYMOUS
    token = sign(rsa_key, "RS256", uid=None, exp=None)
    assert rs256.authenticate(bearer(token)) == Auth(role="admin")


@pytest.mark.parametrize("value", [42, ["IDABC0000001"], {"id": 1}, True])
def test_claims_of_the_wrong_type_count_as_missing(
    rs256: Authenticator, rsa_key: rsa.RSAPrivateKey, value: object
) -> None:
    token = sign(rsa_key, "RS256", uid=value, role=value, exp=None)
    assert rs256.authenticate(bearer(token)) == ANONYMOUS


def test_sub_and_jti_are_not_checked(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(rsa_key, "RS256", sub=7, jti=["x"])
    assert rs256.authenticate(bearer(token)).uid == "IDABC0000001"


def test_auth_is_frozen() -> None:
    assert Auth(uid="", role="") == ANONYMOUS
    with pytest.raises(dataclasses.FrozenInstanceError):
        ANONYMOUS.uid = "x"  # type: ignore[misc]
    # Held by every connection: slots, no per-instance dict.
    assert not hasattr(ANONYMOUS, "__dict__")


# --- expiry and renewal (the auth event) ----------------------------------------------------------


def test_expires_is_exp_plus_the_expiration_leeway(rsa_key: rsa.RSAPrivateKey) -> None:
    exp = int(time.time()) + 600
    token = bearer(sign(rsa_key, "RS256", exp=exp))
    key = env_key(rsa_key.public_key())
    assert Authenticator(key).authenticate(token).expires == exp
    assert Authenticator(key, default_leeway=30).authenticate(token).expires == exp + 30
    # The exp leeway replaces the default one; the others do not count.
    specific = Authenticator(key, default_leeway=30, expiration_leeway=5, issued_at_leeway=90)
    assert specific.authenticate(token).expires == exp + 5


def test_expires_keeps_a_fractional_exp(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    exp = time.time() + 600.25
    assert rs256.authenticate(bearer(sign(rsa_key, "RS256", exp=exp))).expires == exp


def test_a_token_without_exp_never_expires(
    rs256: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    assert rs256.authenticate(bearer(sign(rsa_key, "RS256", exp=None))).expires is None
    assert ANONYMOUS.expires is None


def test_verify_takes_the_bare_token_with_the_same_checks(
    rs256: Authenticator, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(rsa_key, "RS256")
    assert rs256.verify(token) == rs256.authenticate(bearer(token))
    cases = [
        ("", "missing bearer token"),
        (bearer(token), "malformed token"),  # the header form is not a token
        ("é" + token, "malformed token"),
        (sign(other_rsa_key, "RS256"), "invalid signature"),
        (sign(rsa_key, "RS256", exp=int(time.time()) - 30), "token expired"),
        (unsigned(), "algorithm not allowed"),
    ]
    for candidate, reason in cases:
        with pytest.raises(AuthError) as info:
            rs256.verify(candidate)
        assert info.value.reason == reason, candidate
    with pytest.raises(AuthError) as info:
        Authenticator(None).verify(token)
    assert info.value.reason == "authentication is not configured"


def renewal_refused(authenticator: Authenticator, current: Auth, token: str) -> str:
    with pytest.raises(AuthError) as info:
        authenticator.renew(current, token)
    return info.value.reason


def test_renew_with_a_later_token(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    current = rs256.authenticate(bearer(sign(rsa_key, "RS256", exp=now + 60)))
    renewed = rs256.renew(current, sign(rsa_key, "RS256", exp=now + 3600))
    assert renewed == Auth(uid="IDABC0000001", role="admin", expires=now + 3600)


def test_renew_refusals(
    rs256: Authenticator, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    now = int(time.time())
    current = Auth(uid="IDABC0000001", role="admin", expires=now + 60)
    later = now + 3600
    cases = [
        (sign(other_rsa_key, "RS256", exp=later), "invalid signature"),
        (sign(rsa_key, "RS256", exp=now - 30), "token expired"),
        (
            sign(rsa_key, "RS256", uid="IDOTHER00001", exp=later),
            "uid does not match the connection",
        ),
        (sign(rsa_key, "RS256", uid=None, exp=later), "uid does not match the connection"),
        (
            sign(rsa_key, "RS256", role="superadmin", exp=later),
            "role does not match the connection",
        ),
        (sign(rsa_key, "RS256", exp=now + 60), "token does not expire later than the current one"),
        (sign(rsa_key, "RS256", exp=now + 30), "token does not expire later than the current one"),
        # No exp would make the connection last forever: a fresh connection is the way to that.
        (sign(rsa_key, "RS256", exp=None), "missing exp claim"),
    ]
    for token, reason in cases:
        assert renewal_refused(rs256, current, token) == reason, reason


def test_renewal_of_a_token_without_exp(rs256: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    current = Auth(uid="IDABC0000001", role="admin")
    # Another token that never expires changes nothing, and is accepted.
    assert rs256.renew(current, sign(rsa_key, "RS256", exp=None)) == current
    # One that expires would end a connection that was not going to end.
    token = sign(rsa_key, "RS256", exp=int(time.time()) + 3600)
    assert renewal_refused(rs256, current, token) == (
        "token does not expire later than the current one"
    )


def test_an_anonymous_connection_gains_nothing_by_renewal(
    rs256: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    later = int(time.time()) + 3600
    for token in (sign(rsa_key, "RS256", exp=later), sign(rsa_key, "RS256", uid=None, exp=None)):
        assert renewal_refused(rs256, ANONYMOUS, token).endswith("does not match the connection")


# --- error reasons never carry the token ----------------------------------------------------------


def test_reasons_never_contain_the_token(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    authenticator = Authenticator(env_key(rsa_key.public_key()), issuer="qux", audience=("foo",))
    now = int(time.time())
    tokens = [
        sign(rsa_key, "RS256", exp=now - 100, iss="qux", aud="foo"),
        sign(rsa_key, "RS256", nbf=now + 100, iss="qux", aud="foo"),
        sign(rsa_key, "RS256", iat=now + 100, iss="qux", aud="foo"),
        sign(rsa_key, "RS256", iss="hacker", aud="foo"),
        sign(rsa_key, "RS256", iss="qux", aud="baz"),
        sign(other_rsa_key, "RS256", iss="qux", aud="foo"),
        sign(rsa_key, "RS256", iss="qux", aud="foo", exp="soon"),
        "garbage-token-value",
        "eyJhbGciOiJSUzI1NiJ9.not-json-at-all.c2ln",
    ]
    for token in tokens:
        with pytest.raises(AuthError) as info:
            authenticator.authenticate(bearer(token))
        for text in (info.value.reason, str(info.value), repr(info.value)):
            assert token not in text
            for segment in token.split("."):
                assert len(segment) < 8 or segment not in text
        assert info.value.__cause__ is None


# --- from_config ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    jwt_public_key: str | None = None
    jwt_algorithm: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: tuple[str, ...] = ()
    jwt_default_leeway: int = 0
    jwt_issued_at_leeway: int | None = None
    jwt_expiration_leeway: int | None = None
    jwt_not_before_leeway: int | None = None


def test_from_config(rsa_key: rsa.RSAPrivateKey) -> None:
    config = FakeConfig(
        jwt_public_key=env_key(rsa_key.public_key()),
        jwt_algorithm="RS384",
        jwt_issuer="barong",
        jwt_audience=("peatio",),
        jwt_default_leeway=0,
        jwt_issued_at_leeway=60,
    )
    authenticator = Authenticator.from_config(config)
    assert authenticator.enabled
    # JWT_ALGORITHM replaced the RSA key's own RS256.
    assert refused(authenticator, bearer(sign(rsa_key, "RS256"))) == "algorithm not allowed"
    now = int(time.time())
    assert authenticator.authenticate(bearer(sign(rsa_key, "RS384", iat=now + 30))).uid
    assert refused(authenticator, bearer(sign(rsa_key, "RS384", iss="x"))) == "invalid issuer"
    assert refused(authenticator, bearer(sign(rsa_key, "RS384", aud=["barong"]))) == (
        "invalid audience"
    )
    assert refused(authenticator, bearer(sign(rsa_key, "RS384", exp=now - 30))) == ("token expired")


def test_from_config_unset() -> None:
    assert not Authenticator.from_config(FakeConfig()).enabled


def test_from_config_errors_name_the_variable(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError) as info:
        Authenticator.from_config(FakeConfig(jwt_public_key="not a key!"))
    assert info.value.variable == "JWT_PUBLIC_KEY"
    with pytest.raises(ConfigError) as info:
        Authenticator.from_config(
            FakeConfig(jwt_public_key=env_key(rsa_key.public_key()), jwt_algorithm="EdDSA")
        )
    assert info.value.variable == "JWT_ALGORITHM"
