"""The console's login session: a signed cookie, and the CSRF token bound to it.

Stateless, so that every worker process accepts it: the cookie holds an expiry and a random nonce,
signed with HMAC-SHA256 under a key derived from the admin token (a new admin token ends every session).
The CSRF token of a session is an HMAC of its nonce under the same key: a form carries it, a cookie
alone (another site's form, sent by the browser) does not.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

COOKIE_NAME = "facefl_console"
COOKIE_PATH = "/console"
LIFETIME_S = 8 * 3600

_VALUE = re.compile(r"([0-9]{1,12})\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class Session:
    expires: int  # unix seconds
    nonce: str


def _key(admin_token: str) -> bytes:
    return hmac.new(admin_token.encode("utf-8"), b"facefl console session v1", hashlib.sha256).digest()


def _mac(key: bytes, message: str) -> str:
    digest = hmac.new(key, message.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_session(now: float | None = None) -> Session:
    now = time.time() if now is None else now
    return Session(expires=int(now) + LIFETIME_S, nonce=secrets.token_urlsafe(16))


def encode(session: Session, admin_token: str) -> str:
    """The cookie value: ``expires.nonce.signature``."""
    body = f"{session.expires}.{session.nonce}"
    return f"{body}.{_mac(_key(admin_token), 'session.' + body)}"


def decode(value: str | None, admin_token: str, now: float | None = None) -> Session | None:
    """The session a cookie value carries, or None: malformed, forged (or signed under another admin
    token) or expired."""
    if value is None:
        return None
    match = _VALUE.fullmatch(value)
    if match is None:
        return None
    expires, nonce, signature = match.groups()
    expected = _mac(_key(admin_token), f"session.{expires}.{nonce}")
    if not hmac.compare_digest(signature, expected):
        return None
    if int(expires) <= (time.time() if now is None else now):
        return None
    return Session(expires=int(expires), nonce=nonce)


def csrf_token(session: Session, admin_token: str) -> str:
    return _mac(_key(admin_token), f"csrf.{session.nonce}")


def csrf_ok(session: Session, admin_token: str, submitted: str | None) -> bool:
    if not submitted:
        return False
    return hmac.compare_digest(submitted.encode("utf-8"), csrf_token(session, admin_token).encode("ascii"))
