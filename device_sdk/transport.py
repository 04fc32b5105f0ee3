"""The SDK's one way to the server: an HTTP connection with retries, and the status -> error mapping.

:class:`Connection` wraps one :class:`httpx.Client` (connection pooling, finite timeouts, an injectable
``httpx.BaseTransport``) and is what :class:`~device_sdk.FederatedClient` and
:class:`~device_sdk.AdminClient` send their requests through. It holds no global state: the random
generator used for jitter is its own, and ``sleep`` can be injected.

Retries: idempotent calls are retried with jittered exponential backoff on transport errors and 5xx
answers, up to ``max_retries`` times. Non-idempotent calls are retried only when the connection could not
be established, i.e. when the server cannot have seen the request. A 429, and a 503 ``busy`` (too many
uploads in flight, refused before the body is read), of any call is retried after the advised
``Retry-After`` (the server did nothing with the request). Every other failure becomes a typed
error from :mod:`device_sdk.errors` (:func:`error_for`).
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx

from .errors import (
    APIError,
    AuthError,
    DuplicateUpload,
    FaceflError,
    InvalidRequest,
    NotFound,
    ProtocolError,
    RateLimited,
    RoundClosed,
    ServerError,
    TransportError,
    UpdateRejected,
)
from .records import TransferStats

__all__ = [
    "DEFAULT_TIMEOUT",
    "USER_AGENT",
    "Connection",
    "SharedTransport",
    "error_for",
    "parse_retry_after",
]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
USER_AGENT = "facefl-device-sdk/0.1"

# Failures where the request cannot have reached the server: safe to retry even a non-idempotent call.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class SharedTransport(httpx.BaseTransport):
    """One connection pool for many clients: closing a client that uses it leaves the pool open.

    Building an :class:`httpx.Client` builds its transport, and with it an SSL context (about 20 ms of
    CPU); a process that creates a client per job (the simulator's workers, one job per device and round)
    passes one ``SharedTransport`` to all of them instead. Call :meth:`close_pool` when done.
    """

    def __init__(self, inner: httpx.BaseTransport | None = None) -> None:
        self._inner = inner if inner is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._inner.handle_request(request)

    def close(self) -> None:
        """Called by every client that closes; the shared pool stays open."""

    def close_pool(self) -> None:
        self._inner.close()


class Connection:
    """An HTTP connection to one facefl server: bearer token, retries with backoff, typed errors.

    Args:
        base_url: the server root, e.g. ``http://127.0.0.1:8000``.
        token: the bearer token sent with every authenticated request (may be set later).
        timeout: per-request timeouts (finite by default: 30 s, 5 s to connect). Infinite ones are refused.
        transport: an ``httpx.BaseTransport`` to route, record or share traffic.
        max_retries: retries of a failed idempotent request (and of a connection failure or a 429 of any
            request).
        backoff_base_s, backoff_cap_s: the exponential backoff (with jitter) between retries.
        rng: the random generator for jitter; sleep: injectable for tests and simulators.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if None in (timeout.connect, timeout.read, timeout.write, timeout.pool):
            raise ValueError("timeouts must be finite: a request without one can hang forever")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stats = TransferStats()
        self.rng = rng if rng is not None else random.Random()
        self.sleep = sleep
        self.http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    def close(self) -> None:
        self.http.close()

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with "equal jitter": uniform in [d/2, d], d = min(cap, base * 2^attempt)."""
        rng = rng if rng is not None else self.rng
        d = min(self.backoff_cap_s, self.backoff_base_s * (2.0 ** min(attempt, 30)))
        return d / 2 + rng.uniform(0.0, d / 2)

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        auth: bool = True,
        json_body: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        expect: Iterable[int] = (200, 201),
        upload: bool = False,
    ) -> httpx.Response:
        """Send a request, retrying as the module docstring says; an unexpected status raises
        :func:`error_for`'s typed error (``upload``: a 413/422 is an :class:`UpdateRejected`)."""
        all_headers = dict(headers or {})
        if auth and self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        expected = tuple(expect)
        attempt = 0
        while True:
            request = self.http.build_request(
                method, path, json=json_body, content=content, params=params, headers=all_headers
            )
            self.stats.requests += 1
            try:
                resp = self.http.send(request)
                body = resp.read()
            except httpx.TransportError as exc:
                not_sent = isinstance(exc, _NOT_SENT)  # the server cannot have seen this request
                retriable = idempotent or not_sent
                if not not_sent:
                    self.stats.bytes_sent += len(request.content)
                if retriable and attempt < self.max_retries:
                    self.stats.retries += 1
                    self.sleep(self.backoff(attempt))
                    attempt += 1
                    continue
                raise TransportError(f"{method} {request.url}: {type(exc).__name__}: {exc}") from exc
            self.stats.bytes_sent += len(request.content)
            self.stats.bytes_received += len(body)
            if resp.status_code >= 500 and idempotent and attempt < self.max_retries:
                advised = parse_retry_after(resp.headers.get("Retry-After")) or 0.0
                self.stats.retries += 1
                self.sleep(max(advised, self.backoff(attempt)))
                attempt += 1
                continue
            if _refused_unread(resp, body) and attempt < self.max_retries:
                # rate limited (429) or busy (503 busy: too many uploads in flight, refused before the
                # body was read): the server did nothing with this request, so any method may be sent
                # again once the advised Retry-After has passed (plus jitter, so devices spread out)
                told = parse_retry_after(resp.headers.get("Retry-After"))
                wait = told if told is not None else self.backoff(attempt)
                self.stats.retries += 1
                self.sleep(wait * (1.0 + 0.2 * self.rng.random()))
                attempt += 1
                continue
            if resp.status_code in expected:
                return resp
            raise error_for(resp, upload=upload)

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET an idempotent JSON resource (object or list)."""
        return self.json(self.request("GET", path, idempotent=True, params=params), kind=None)

    @staticmethod
    def json(resp: httpx.Response, *, kind: type | None = dict) -> Any:
        """The response's JSON (by default it must be an object); else ProtocolError."""
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(
                f"{resp.request.method} {resp.request.url}: response is not JSON",
                status_code=resp.status_code,
            ) from exc
        if kind is not None and not isinstance(data, kind):
            raise ProtocolError(
                f"{resp.request.method} {resp.request.url}: response is not a JSON {kind.__name__}",
                status_code=resp.status_code,
            )
        return data


def error_for(resp: httpx.Response, *, upload: bool) -> FaceflError:
    """Map an unexpected HTTP status to the SDK's typed error, with the server's ``detail`` and ``code``."""
    status = resp.status_code
    detail, code = _error_body(resp)
    kw: dict[str, Any] = {
        "status_code": status,
        "code": code,
        "method": resp.request.method,
        "url": str(resp.request.url),
    }
    if status in (401, 403):
        return AuthError(detail, **kw)
    if status == 404:
        return NotFound(detail, **kw)
    if status == 409:
        return DuplicateUpload(detail, **kw)
    if status == 410:
        return RoundClosed(detail, **kw)
    if status == 429:
        retry = parse_retry_after(resp.headers.get("Retry-After"))
        return RateLimited(detail, retry_after=retry if retry is not None else 1.0, **kw)
    if status in (413, 422) and upload:
        return UpdateRejected(detail, **kw)
    if status in (400, 413, 422):
        return InvalidRequest(detail, **kw)
    if status >= 500:
        return ServerError(detail, **kw)
    if 400 <= status < 500:
        return APIError(detail, **kw)
    return ProtocolError(f"unexpected HTTP status {status}: {detail}", status_code=status)


def _error_body(resp: httpx.Response) -> tuple[str, str | None]:
    try:
        data = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = resp.text.strip()
        return (text[:500] or resp.reason_phrase or "error"), None
    if isinstance(data, dict):
        detail = data.get("detail")
        code = data.get("code")
        if not isinstance(detail, str):
            detail = json.dumps(detail)[:1000] if detail is not None else (resp.reason_phrase or "error")
        return detail, (str(code) if code is not None else None)
    return json.dumps(data)[:500], None


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _refused_unread(resp: httpx.Response, body: bytes) -> bool:
    """The server refused the request before doing anything with it: 429, or 503 with code ``busy``."""
    if resp.status_code == 429:
        return True
    if resp.status_code != 503:
        return False
    try:
        return bool(json.loads(body).get("code") == "busy")
    except (ValueError, AttributeError):
        return False
