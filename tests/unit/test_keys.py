"""ranger_py.keys: the key check the master runs before anything listens (PROTOCOL §3)."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ranger_py.errors import ConfigError
from ranger_py.keys import load_verify_key


def _env(pem: bytes) -> str:
    return base64.b64encode(pem).decode()


def test_no_key_means_authentication_off() -> None:
    assert load_verify_key(None) is None
    assert load_verify_key("") is None


def test_a_key_and_its_algorithm() -> None:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    loaded = load_verify_key(_env(pem))
    assert loaded is not None
    assert loaded[1] == "EdDSA"


def test_a_private_key_is_refused_without_being_quoted() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    value = _env(pem)
    with pytest.raises(ConfigError) as info:
        load_verify_key(value)
    assert str(info.value) == "JWT_PUBLIC_KEY: holds a PRIVATE KEY; it must be the public key"
    assert value[:20] not in str(info.value)


def test_checking_a_key_does_not_import_pyjwt() -> None:
    # The gunicorn master checks the key before forking; PyJWT imports names from ssl that
    # gevent must patch first in each worker, so the master must not import it.
    code = "import sys, ranger_py.keys; print('jwt' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
