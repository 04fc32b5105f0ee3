"""HTTP client for the facefl round protocol (docs/protocol.md), as a device app embeds it.

:class:`FederatedClient` is the thin public face of the SDK's layers: it sends requests through a
:class:`~device_sdk.transport.Connection` (finite timeouts, retries with jittered backoff, status codes
mapped to :mod:`device_sdk.errors`), answers with the typed records of :mod:`device_sdk.records`, and
keeps immutable downloads in a :class:`~device_sdk.cache.DownloadCache`. It holds no global state: every
setting is an argument, the random generator used for jitter is its own, and ``sleep``/``clock`` can be
injected. Traffic can be routed, recorded or shared by passing an ``httpx.BaseTransport``.

Retries: idempotent calls (every GET, and check-in) are retried on transport errors and 5xx answers, up to
``max_retries`` times. Non-idempotent calls (registration, update upload) are retried only when the
connection could not be established, i.e. when the server cannot have seen the request.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from facefl import codec, compression
from facefl.algorithms.fedface import CLASS_EMBEDDING_KEY
from facefl.data.public import PublicSet, decode_pack

from . import secagg
from .cache import DownloadCache, fetch_immutable
from .errors import (
    AssignmentTimeout,
    ProtocolError,
    RateLimited,
    ServerError,
    TaskCompleted,
    TransportError,
)
from .records import (
    Assignment,
    DeviceCredentials,
    RoundInfo,
    TaskInfo,
    TransferStats,
    UploadReceipt,
    WaitInstruction,
)
from .transport import DEFAULT_TIMEOUT, USER_AGENT, Connection, parse_retry_after

#: check-in wait reasons after which the task never hands out an assignment again: the task finished its
#: rounds, or one more round would exceed its differential-privacy budget
TASK_OVER = frozenset({"task_completed", "privacy_budget_exhausted"})

__all__ = [
    "DEFAULT_TIMEOUT",
    "USER_AGENT",
    "Assignment",
    "DeviceCredentials",
    "FederatedClient",
    "RoundInfo",
    "TaskInfo",
    "TransferStats",
    "UploadReceipt",
    "WaitInstruction",
]


class FederatedClient:
    """A device's connection to a facefl server.

    Use it as a context manager (or call :meth:`close`)::

        with FederatedClient("https://fl.example", token=creds.token, device_id=creds.device_id) as c:
            assignment = c.wait_for_assignment(task_id=1, timeout_s=600)
            base = c.download_model(assignment.base_version)
            ...
            c.upload_update(assignment, delta, num_samples=len(dataset))

    Args:
        base_url: the server root, e.g. ``http://127.0.0.1:8000``.
        token, device_id: credentials from an earlier :meth:`register` (or set by it).
        timeout: per-request timeouts (finite by default: 30 s, 5 s to connect).
        transport: an ``httpx.BaseTransport`` to route or record traffic (tests, simulators, proxies).
        max_retries: retries of a failed idempotent request (and of a connection failure or a 429 of any
            request; after a 429 the client first waits the advised Retry-After).
        cache_dir: optional directory of downloaded models, revalidated with ``If-None-Match``.
        backoff_base_s, backoff_cap_s: the exponential backoff (with jitter) between retries.
        rng: the random generator for jitter (a private ``random.Random()`` by default).
        sleep, clock: injectable for tests and simulators (default ``time.sleep`` / ``time.monotonic``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        device_id: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 3,
        cache_dir: str | Path | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conn = Connection(
            base_url,
            token=token,
            timeout=timeout,
            transport=transport,
            max_retries=max_retries,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            rng=rng,
            sleep=sleep,
        )
        self.base_url = self._conn.base_url
        self.device_id = device_id
        self._clock = clock
        self._cache = DownloadCache(cache_dir, self.base_url) if cache_dir is not None else None

    # ----------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> FederatedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # the connection's settings, readable and adjustable here as before the transport had a module of its own
    @property
    def token(self) -> str | None:
        return self._conn.token

    @token.setter
    def token(self, value: str | None) -> None:
        self._conn.token = value

    @property
    def max_retries(self) -> int:
        return self._conn.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        if value < 0:
            raise ValueError("max_retries must be >= 0")
        self._conn.max_retries = value

    @property
    def backoff_base_s(self) -> float:
        return self._conn.backoff_base_s

    @backoff_base_s.setter
    def backoff_base_s(self, value: float) -> None:
        self._conn.backoff_base_s = value

    @property
    def backoff_cap_s(self) -> float:
        return self._conn.backoff_cap_s

    @backoff_cap_s.setter
    def backoff_cap_s(self, value: float) -> None:
        self._conn.backoff_cap_s = value

    @property
    def stats(self) -> TransferStats:
        """What this client put on and took off the wire (request/response bodies)."""
        return self._conn.stats

    @property
    def timeout(self) -> httpx.Timeout:
        """The per-request timeouts (always finite)."""
        return self._conn.http.timeout

    @property
    def credentials(self) -> DeviceCredentials | None:
        if self.token is None or self.device_id is None:
            return None
        return DeviceCredentials(device_id=self.device_id, token=self.token)

    # ------------------------------------------------------------------------------------ protocol

    def register(
        self,
        enrollment_secret: str,
        name: str | None = None,
        capabilities: Mapping[str, Any] | None = None,
    ) -> DeviceCredentials:
        """``POST /v1/devices``: enroll this device; the returned token is kept for later calls."""
        body = {
            "enrollment_secret": enrollment_secret,
            "name": name,
            "capabilities": dict(capabilities) if capabilities is not None else None,
        }
        resp = self._conn.request("POST", "/v1/devices", json_body=body, idempotent=False, auth=False)
        data = self._conn.json(resp)
        try:
            creds = DeviceCredentials(device_id=str(data["device_id"]), token=str(data["token"]))
        except (KeyError, TypeError) as exc:
            raise ProtocolError(
                f"malformed registration answer: {exc!r}", status_code=resp.status_code
            ) from exc
        self.device_id, self.token = creds.device_id, creds.token
        return creds

    def checkin(
        self, task_id: int | None = None, capabilities: Mapping[str, Any] | None = None
    ) -> Assignment | WaitInstruction:
        """``POST /v1/checkin``: offer this device; the server answers an assignment or "wait".

        ``capabilities`` (optional): ``{"accelerator": "cpu" | "cuda" | ..., "num_samples": int}``.
        Checking in again while holding an unused assignment of the open round returns that assignment
        with a fresh upload token (the previous token stops working).
        """
        body = {
            "task_id": task_id,
            "capabilities": dict(capabilities) if capabilities is not None else None,
        }
        resp = self._conn.request("POST", "/v1/checkin", json_body=body, idempotent=True)
        data = self._conn.json(resp)
        action = data.get("action")
        if action == "train":
            return Assignment.from_json(data.get("assignment") or {})
        if action == "wait":
            retry = data.get("retry_after_s")
            if retry is None:
                retry = parse_retry_after(resp.headers.get("Retry-After")) or 0.0
            try:
                retry_s = max(0.0, float(retry))
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"bad retry_after_s {retry!r}", status_code=resp.status_code) from exc
            return WaitInstruction(retry_after_s=retry_s, reason=str(data.get("reason") or "unspecified"))
        raise ProtocolError(f"unknown check-in action {action!r}", status_code=resp.status_code)

    def wait_for_assignment(
        self,
        task_id: int | None = None,
        *,
        timeout_s: float = 600.0,
        rng: random.Random | None = None,
        capabilities: Mapping[str, Any] | None = None,
    ) -> Assignment:
        """Check in until the server hands out an assignment.

        Honours the server's pace steering: after a "wait" answer (or a 429) it sleeps at least the
        advised ``retry_after_s``, spread by up to 20 % of jitter so that devices do not return in
        lockstep. Transport errors and 5xx answers that outlast the per-call retries are absorbed with
        jittered exponential backoff until the time budget runs out.

        Raises:
            AssignmentTimeout: no assignment within ``timeout_s`` seconds.
            TaskCompleted: the server says the task is completed.
            AuthError, InvalidRequest, ...: failures that waiting cannot cure.
        """
        rng = rng if rng is not None else self._conn.rng
        deadline = self._clock() + timeout_s
        failures = 0
        idle_waits = 0
        last_reason: str | None = None
        while True:
            delay: float
            try:
                answer = self.checkin(task_id, capabilities)
            except RateLimited as exc:
                last_reason = "rate_limited"
                delay = exc.retry_after * (1.0 + 0.2 * rng.random())
            except (TransportError, ServerError) as exc:
                last_reason = type(exc).__name__
                delay = self._conn.backoff(failures, rng)
                failures += 1
            else:
                failures = 0
                if isinstance(answer, Assignment):
                    return answer
                last_reason = answer.reason
                if answer.reason in TASK_OVER:
                    raise TaskCompleted(f"task {task_id} is over ({answer.reason})")
                if answer.retry_after_s > 0:
                    delay = answer.retry_after_s * (1.0 + 0.2 * rng.random())
                else:  # no advice from the server: back off on our own
                    delay = self._conn.backoff(idle_waits, rng)
                    idle_waits += 1
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise AssignmentTimeout(
                    f"no assignment within {timeout_s:g} s (last answer: {last_reason})",
                    last_reason=last_reason,
                )
            self._conn.sleep(min(delay, remaining))

    def download_model(self, version: int) -> dict[str, np.ndarray]:
        """``GET /v1/models/{version}``: the global weights as NumPy arrays.

        With a ``cache_dir`` the weights are kept on disk and revalidated with ``If-None-Match`` (model
        versions are immutable, so a 304 is the usual answer). The body's SHA-256 is checked against the
        ``ETag`` when the server sends one.
        """
        path, name = f"/v1/models/{int(version)}", f"model-{int(version)}"
        return fetch_immutable(self._conn, path, codec.decode, cache=self._cache, name=name)

    def download_public_pack(self, task_id: int) -> PublicSet:
        """FedFR: ``GET /v1/tasks/{id}/public-pack``, the task's public face images with identity labels.

        Large but identical for every device and round: with a ``cache_dir`` it is fetched once.
        """
        return fetch_immutable(
            self._conn,
            f"/v1/tasks/{int(task_id)}/public-pack",
            decode_pack,
            cache=self._cache,
            name=f"public-pack-{int(task_id)}",
        )

    def download_public_bank(self, version: int) -> tuple[np.ndarray, np.ndarray]:
        """FedFR: the public feature bank of a model version: float32 embeddings (N, d), labels (N,)."""

        def parse(body: bytes) -> tuple[np.ndarray, np.ndarray]:
            tensors = codec.decode(body)
            emb, labels = tensors.get("embeddings"), tensors.get("labels")
            if emb is None or labels is None or emb.ndim != 2 or labels.shape != (len(emb),):
                raise ValueError("a public bank holds embeddings (N, d) and labels (N,)")
            return emb.astype(np.float32), labels.astype(np.int64)

        return fetch_immutable(self._conn, f"/v1/models/{int(version)}/public-bank", parse)

    def download_class_embedding(self, version: int) -> np.ndarray | None:
        """FedFace: this device's class embedding after the server's spreadout (None before it reported)."""
        path = f"/v1/models/{int(version)}/class-embedding"
        resp = self._conn.request("GET", path, idempotent=True, expect=(200, 404))
        if resp.status_code == 404:
            return None
        try:
            tensors = codec.decode(resp.content)
            return np.asarray(tensors[CLASS_EMBEDDING_KEY], np.float32)
        except (codec.CodecError, KeyError) as exc:
            raise ProtocolError(f"class embedding of version {version}: {exc}", status_code=200) from exc

    def upload_update(
        self,
        assignment: Assignment,
        delta: Mapping[str, np.ndarray],
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> UploadReceipt:
        """``POST /v1/rounds/{id}/updates``: send ``delta`` (local - base, every tensor of the base).

        Only the delta, the sample count and the numeric training metrics leave the device. The upload
        is retried only if the connection could not be established.

        Raises:
            RoundClosed (410), DuplicateUpload (409), UpdateRejected (413/422), AuthError (401/403), ...
        """
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        body = compression.encode_payload(delta, assignment.update_encoding)
        headers = {
            "X-Upload-Token": assignment.upload_token,
            "Content-Type": "application/octet-stream",
        }
        if metrics:
            clean = {str(k): float(v) for k, v in metrics.items()}
            headers["X-Metrics"] = json.dumps(clean, separators=(",", ":"), allow_nan=False)
        resp = self._conn.request(
            "POST",
            f"/v1/rounds/{assignment.round_id}/updates",
            params={"num_samples": int(num_samples)},
            content=body,
            headers=headers,
            idempotent=False,
            upload=True,
            expect=(200, 201, 202),
        )
        data = self._conn.json(resp)
        try:
            return UploadReceipt(
                update_id=str(data["update_id"]),
                round_id=int(data.get("round_id", assignment.round_id)),
                reports=int(data.get("reports") or 0),
                bytes_sent=len(body),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed upload receipt: {exc!r}", status_code=resp.status_code) from exc

    def upload_secure(
        self,
        assignment: Assignment,
        delta: Mapping[str, np.ndarray],
        num_samples: int,
        *,
        step: Callable[[str, Callable[[], Any]], Any] | None = None,
    ) -> UploadReceipt:
        """Secure aggregation (the assignment's ``secure_aggregation``): clip, weight and quantize ``delta``
        on the device, then run the protocol's stages (:mod:`device_sdk.secagg`), so that the server
        learns only the cohort's sum. ``step(name, fn)`` wraps each request (see ``RoundHooks.call``).

        Raises:
            SecureAggregationError: the round was abandoned, a stage did not come, or the server's data
                was refused; RoundClosed, DuplicateUpload, UpdateRejected, AuthError, ... as for uploads.
        """
        if self.device_id is None:
            raise ValueError("secure aggregation needs the client's device_id")
        return secagg.upload_secure(
            self._conn,
            self.device_id,
            assignment,
            delta,
            num_samples,
            step=step if step is not None else (lambda _name, fn: fn()),
            clock=self._clock,
        )

    def get_round(self, round_id: int) -> RoundInfo:
        """``GET /v1/rounds/{id}``."""
        resp = self._conn.request("GET", f"/v1/rounds/{int(round_id)}", idempotent=True)
        return RoundInfo.from_json(self._conn.json(resp))

    def get_task(self, task_id: int) -> TaskInfo:
        """``GET /v1/tasks/{id}``."""
        resp = self._conn.request("GET", f"/v1/tasks/{int(task_id)}", idempotent=True)
        return TaskInfo.from_json(self._conn.json(resp))

    def get_model_info(self, version: int) -> dict[str, Any]:
        """``GET /v1/models/{version}/info``: architecture, embedding_dim, lineage, sha256, metrics."""
        return self._conn.json(self._conn.request("GET", f"/v1/models/{int(version)}/info", idempotent=True))
