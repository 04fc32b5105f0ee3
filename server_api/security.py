"""Tokens: random secrets handed out once, stored as SHA-256 hashes, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def make_device_token(device_id: str, secret: str) -> str:
    """The bearer token names its device so that lookup is by primary key, not by secret."""
    return f"{device_id}.{secret}"


def split_device_token(token: str) -> tuple[str, str] | None:
    device_id, sep, secret = token.partition(".")
    if not sep or not device_id or not secret or len(device_id) > 32:
        return None
    return device_id, secret


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
