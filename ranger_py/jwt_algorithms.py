"""The JWT algorithms ranger-py verifies: one list, for the configuration and the key loader.

A module of its own so that ranger_py.config (which must not import cryptography) and
ranger_py.keys (which does) share it without importing each other. "none" and HS* are absent on
purpose: with a public key as the HMAC secret, anyone could sign.
"""

from __future__ import annotations

__all__ = ["JWT_ALGORITHMS"]

JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA")
