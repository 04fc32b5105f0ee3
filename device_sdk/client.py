"""HTTP client for the facefl round protocol (docs/protocol.md), as a device app embeds it.

One :class:`FederatedClient` wraps one :class:`httpx.Client` (connection pooling, finite timeouts). It
holds no global state: every setting is an argument, the random generator used for jitter is its own,
and ``sleep``/``clock`` can be injected. Traffic can be routed or recorded by passing an
``httpx.BaseTransport``.

Retries: idempotent calls (every GET, and check-in) are retried with jittered exponential backoff on
transport errors and 5xx answers, up to ``max_retries`` times. Non-idempotent calls (registration, update
upload) are retried only when the connection could not be established, i.e. when the server cannot have
seen the request. Every other failure is mapped to a typed error from :mod:`device_sdk.errors`.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from facefl import codec, compression
from facefl.algorithms.fedface import CLASS_EMBEDDING_KEY
from facefl.data.public import PublicSet, decode_pack
from facefl.fileio import atomic_write_bytes

from .errors import (
    APIError,
    AssignmentTimeout,
    AuthError,
    DuplicateUpload,
    FaceflError,
    InvalidRequest,
    NotFound,
    ProtocolError,
    RateLimited,
    RoundClosed,
    ServerError,
    TaskCompleted,
    TransportError,
    UpdateRejected,
)

__all__ = [
    "Assignment",
    "DeviceCredentials",
    "FederatedClient",
    "RoundInfo",
    "TaskInfo",
    "TransferStats",
    "UploadReceipt",
    "WaitInstruction",
]

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
USER_AGENT = "facefl-device-sdk/0.1"

# Failures where the request cannot have reached the server: safe to retry even a non-idempotent call.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


# --------------------------------------------------------------------------------------------- records


_T = TypeVar("_T")


@dataclass(frozen=True)
class DeviceCredentials:
    """What registration returns: the device's id and its bearer token (shown once by the server)."""

    device_id: str
    token: str

    def save(self, path: str | Path) -> None:
        """Write the credentials as JSON, readable by the owner only (the token is a secret)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"device_id": self.device_id, "token": self.token}, fh)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> DeviceCredentials:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(device_id=str(data["device_id"]), token=str(data["token"]))


@dataclass(frozen=True)
class Assignment:
    """The server's answer "train": which round, which base model, which hyper-parameters."""

    round_id: int
    task_id: int
    round_number: int
    base_version: int
    algorithm: str
    architecture: str
    embedding_dim: int | None
    image_size: int | None
    hyperparams: dict[str, Any]
    deadline: datetime | None
    upload_token: str
    # partial training: the task's parameter groups and their name prefixes (None: the whole model)
    trainable: tuple[str, ...] | None = None
    trainable_prefixes: tuple[str, ...] | None = None
    # how the delta is encoded for upload, and whether training adds back what encoding dropped
    update_encoding: str = compression.DEFAULT_ENCODING
    update_error_feedback: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Assignment:
        try:
            return cls(
                round_id=int(data["round_id"]),
                task_id=int(data["task_id"]),
                round_number=int(data["round_number"]),
                base_version=int(data["base_version"]),
                algorithm=str(data["algorithm"]),
                architecture=str(data["architecture"]),
                embedding_dim=_opt_int(data.get("embedding_dim")),
                image_size=_opt_int(data.get("image_size")),
                hyperparams=dict(data.get("hyperparams") or {}),
                deadline=_parse_time(data.get("deadline")),
                upload_token=str(data["upload_token"]),
                trainable=_opt_strings(data.get("trainable")),
                trainable_prefixes=_opt_strings(data.get("trainable_prefixes")),
                update_encoding=compression.known_or_default(data.get("update_encoding")),
                update_error_feedback=bool(data.get("update_error_feedback", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed assignment: {exc!r}") from exc


@dataclass(frozen=True)
class WaitInstruction:
    """The server's answer "come back later" (pace steering)."""

    retry_after_s: float
    reason: str  # "no_open_round" | "round_full" | "already_participated" | "task_completed" | ...


@dataclass(frozen=True)
class UploadReceipt:
    """The server accepted (202) and durably stored an update."""

    update_id: str
    round_id: int
    reports: int
    bytes_sent: int


@dataclass(frozen=True)
class RoundInfo:
    """``GET /v1/rounds/{id}``; ``raw`` keeps every field the server sent."""

    id: int
    task_id: int
    number: int
    status: str  # "open" | "aggregating" | "aggregated" | "abandoned"
    base_version: int
    result_version: int | None
    target_reports: int
    min_reports: int
    max_assignments: int | None
    assigned: int
    reported: int
    deadline: datetime | None
    metrics: dict[str, Any]
    # what devices get after the round: result_version, or base_version when the release gate held the
    # result back (None until the round aggregated, and from servers without a gate)
    served_version: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def closed(self) -> bool:
        return self.status in ("aggregated", "abandoned")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundInfo:
        try:
            return cls(
                id=int(data["id"]),
                task_id=int(data["task_id"]),
                number=int(data["number"]),
                status=str(data["status"]),
                base_version=int(data["base_version"]),
                result_version=_opt_int(data.get("result_version")),
                target_reports=int(data.get("target_reports") or 0),
                min_reports=int(data.get("min_reports") or 0),
                max_assignments=_opt_int(data.get("max_assignments")),
                assigned=int(data.get("assigned") or 0),
                reported=int(data.get("reported") or 0),
                deadline=_parse_time(data.get("deadline")),
                metrics=dict(data.get("metrics") or {}),
                served_version=_opt_int(data.get("served_version")),
                raw=dict(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed round: {exc!r}") from exc


@dataclass(frozen=True)
class TaskInfo:
    """``GET /v1/tasks/{id}``; ``raw`` keeps every field the server sent."""

    id: int
    name: str
    algorithm: str
    architecture: str
    embedding_dim: int | None
    image_size: int | None
    rounds: int
    hyperparams: dict[str, Any]
    policy: dict[str, Any]
    status: str  # "running" | "completed"
    current_version: int | None
    aggregated_rounds: int
    current_round: RoundInfo | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskInfo:
        try:
            current = data.get("current_round")
            return cls(
                id=int(data["id"]),
                name=str(data.get("name", "")),
                algorithm=str(data["algorithm"]),
                architecture=str(data["architecture"]),
                embedding_dim=_opt_int(data.get("embedding_dim")),
                image_size=_opt_int(data.get("image_size")),
                rounds=int(data.get("rounds") or 0),
                hyperparams=dict(data.get("hyperparams") or {}),
                policy=dict(data.get("policy") or {}),
                status=str(data["status"]),
                current_version=_opt_int(data.get("current_version")),
                aggregated_rounds=int(data.get("aggregated_rounds") or 0),
                current_round=RoundInfo.from_json(current) if current else None,
                raw=dict(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed task: {exc!r}") from exc


@dataclass
class TransferStats:
    """Counters of what this client put on and took off the wire (request/response bodies)."""

    requests: int = 0
    retries: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


# --------------------------------------------------------------------------------------------- client


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
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.device_id = device_id
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stats = TransferStats()
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._clock = clock
        self._cache_dir: Path | None = None
        if cache_dir is not None:
            server_key = hashlib.sha256(self.base_url.encode()).hexdigest()[:12]
            self._cache_dir = Path(cache_dir) / server_key
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    # ----------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FederatedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
        resp = self._request("POST", "/v1/devices", json_body=body, idempotent=False, auth=False)
        data = self._json(resp)
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
        resp = self._request("POST", "/v1/checkin", json_body=body, idempotent=True)
        data = self._json(resp)
        action = data.get("action")
        if action == "train":
            return Assignment.from_json(data.get("assignment") or {})
        if action == "wait":
            retry = data.get("retry_after_s")
            if retry is None:
                retry = _parse_retry_after(resp.headers.get("Retry-After")) or 0.0
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
        rng = rng if rng is not None else self._rng
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
                delay = self._backoff(failures, rng)
                failures += 1
            else:
                failures = 0
                if isinstance(answer, Assignment):
                    return answer
                last_reason = answer.reason
                if answer.reason == "task_completed":
                    raise TaskCompleted(f"task {task_id} is completed")
                if answer.retry_after_s > 0:
                    delay = answer.retry_after_s * (1.0 + 0.2 * rng.random())
                else:  # no advice from the server: back off on our own
                    delay = self._backoff(idle_waits, rng)
                    idle_waits += 1
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise AssignmentTimeout(
                    f"no assignment within {timeout_s:g} s (last answer: {last_reason})",
                    last_reason=last_reason,
                )
            self._sleep(min(delay, remaining))

    def download_model(self, version: int) -> dict[str, np.ndarray]:
        """``GET /v1/models/{version}``: the global weights as NumPy arrays.

        With a ``cache_dir`` the weights are kept on disk and revalidated with ``If-None-Match`` (model
        versions are immutable, so a 304 is the usual answer). The body's SHA-256 is checked against the
        ``ETag`` when the server sends one.
        """
        return self._download_decoded(f"/v1/models/{int(version)}", f"model-{int(version)}", codec.decode)

    def download_public_pack(self, task_id: int) -> PublicSet:
        """FedFR: ``GET /v1/tasks/{id}/public-pack``, the task's public face images with identity labels.

        Large but identical for every device and round: with a ``cache_dir`` it is fetched once.
        """
        return self._download_decoded(
            f"/v1/tasks/{int(task_id)}/public-pack", f"public-pack-{int(task_id)}", decode_pack
        )

    def download_public_bank(self, version: int) -> tuple[np.ndarray, np.ndarray]:
        """FedFR: the public feature bank of a model version: float32 embeddings (N, d), labels (N,)."""

        def parse(body: bytes) -> tuple[np.ndarray, np.ndarray]:
            tensors = codec.decode(body)
            emb, labels = tensors.get("embeddings"), tensors.get("labels")
            if emb is None or labels is None or emb.ndim != 2 or labels.shape != (len(emb),):
                raise ValueError("a public bank holds embeddings (N, d) and labels (N,)")
            return emb.astype(np.float32), labels.astype(np.int64)

        return self._download_decoded(f"/v1/models/{int(version)}/public-bank", None, parse)

    def download_class_embedding(self, version: int) -> np.ndarray | None:
        """FedFace: this device's class embedding after the server's spreadout (None before it reported)."""
        path = f"/v1/models/{int(version)}/class-embedding"
        resp = self._request("GET", path, idempotent=True, expect=(200, 404))
        if resp.status_code == 404:
            return None
        try:
            tensors = codec.decode(resp.content)
            return np.asarray(tensors[CLASS_EMBEDDING_KEY], np.float32)
        except (codec.CodecError, KeyError) as exc:
            raise ProtocolError(f"class embedding of version {version}: {exc}", status_code=200) from exc

    def _download_decoded(self, path: str, cache_name: str | None, parse: Callable[[bytes], _T]) -> _T:
        """GET an immutable resource (ETag = sha256), verify it, parse it; cached on disk when possible."""
        cached_file = etag_file = None
        headers: dict[str, str] = {}
        if self._cache_dir is not None and cache_name is not None:
            cached_file = self._cache_dir / f"{cache_name}.safetensors"
            etag_file = cached_file.with_suffix(".etag")
            if cached_file.exists() and etag_file.exists():
                headers["If-None-Match"] = etag_file.read_text(encoding="utf-8").strip()
        resp = self._request("GET", path, idempotent=True, headers=headers, expect=(200, 304))
        if resp.status_code == 304:
            if cached_file is None:
                raise ProtocolError("304 Not Modified without a conditional request", status_code=304)
            try:
                return parse(cached_file.read_bytes())
            except (OSError, ValueError):
                # a damaged cache entry: drop it and fetch unconditionally
                cached_file.unlink(missing_ok=True)
                resp = self._request("GET", path, idempotent=True, expect=(200,))
        body = resp.content
        etag = resp.headers.get("ETag")
        if etag:
            expected = etag.strip().removeprefix("W/").strip('"')
            if len(expected) == 64 and hashlib.sha256(body).hexdigest() != expected:
                raise ProtocolError(f"{path}: body does not match its ETag", status_code=200)
        try:
            parsed = parse(body)
        except ValueError as exc:
            raise ProtocolError(f"{path}: {exc}", status_code=resp.status_code) from exc
        if cached_file is not None and etag_file is not None and etag:
            cached_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cached_file, body)
            atomic_write_bytes(etag_file, etag.encode("utf-8"))
        return parsed

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
        resp = self._request(
            "POST",
            f"/v1/rounds/{assignment.round_id}/updates",
            params={"num_samples": int(num_samples)},
            content=body,
            headers=headers,
            idempotent=False,
            upload=True,
            expect=(200, 201, 202),
        )
        data = self._json(resp)
        try:
            return UploadReceipt(
                update_id=str(data["update_id"]),
                round_id=int(data.get("round_id", assignment.round_id)),
                reports=int(data.get("reports") or 0),
                bytes_sent=len(body),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed upload receipt: {exc!r}", status_code=resp.status_code) from exc

    def get_round(self, round_id: int) -> RoundInfo:
        """``GET /v1/rounds/{id}``."""
        resp = self._request("GET", f"/v1/rounds/{int(round_id)}", idempotent=True)
        return RoundInfo.from_json(self._json(resp))

    def get_task(self, task_id: int) -> TaskInfo:
        """``GET /v1/tasks/{id}``."""
        resp = self._request("GET", f"/v1/tasks/{int(task_id)}", idempotent=True)
        return TaskInfo.from_json(self._json(resp))

    def get_model_info(self, version: int) -> dict[str, Any]:
        """``GET /v1/models/{version}/info``: architecture, embedding_dim, lineage, sha256, metrics."""
        return self._json(self._request("GET", f"/v1/models/{int(version)}/info", idempotent=True))

    # ------------------------------------------------------------------------------------ internals

    def _backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with "equal jitter": uniform in [d/2, d], d = min(cap, base * 2^attempt)."""
        rng = rng if rng is not None else self._rng
        d = min(self.backoff_cap_s, self.backoff_base_s * (2.0 ** min(attempt, 30)))
        return d / 2 + rng.uniform(0.0, d / 2)

    def _request(
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
        all_headers = dict(headers or {})
        if auth and self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        expected = tuple(expect)
        attempt = 0
        while True:
            request = self._http.build_request(
                method, path, json=json_body, content=content, params=params, headers=all_headers
            )
            self.stats.requests += 1
            try:
                resp = self._http.send(request)
                body = resp.read()
            except httpx.TransportError as exc:
                not_sent = isinstance(exc, _NOT_SENT)  # the server cannot have seen this request
                retriable = idempotent or not_sent
                if not not_sent:
                    self.stats.bytes_sent += len(request.content)
                if retriable and attempt < self.max_retries:
                    self.stats.retries += 1
                    self._sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                raise TransportError(f"{method} {request.url}: {type(exc).__name__}: {exc}") from exc
            self.stats.bytes_sent += len(request.content)
            self.stats.bytes_received += len(body)
            if resp.status_code >= 500 and idempotent and attempt < self.max_retries:
                advised = _parse_retry_after(resp.headers.get("Retry-After")) or 0.0
                self.stats.retries += 1
                self._sleep(max(advised, self._backoff(attempt)))
                attempt += 1
                continue
            if resp.status_code == 429 and attempt < self.max_retries:
                # rate limited: the server did nothing with this request, so any method may be sent
                # again once the advised Retry-After has passed (plus jitter, so devices spread out)
                told = _parse_retry_after(resp.headers.get("Retry-After"))
                wait = told if told is not None else self._backoff(attempt)
                self.stats.retries += 1
                self._sleep(wait * (1.0 + 0.2 * self._rng.random()))
                attempt += 1
                continue
            if resp.status_code in expected:
                return resp
            raise _error_for(resp, upload=upload)

    @staticmethod
    def _json(resp: httpx.Response) -> dict[str, Any]:
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(
                f"{resp.request.method} {resp.request.url}: response is not JSON",
                status_code=resp.status_code,
            ) from exc
        if not isinstance(data, dict):
            raise ProtocolError(
                f"{resp.request.method} {resp.request.url}: response is not a JSON object",
                status_code=resp.status_code,
            )
        return data


# ------------------------------------------------------------------------------------------- helpers


def _error_for(resp: httpx.Response, *, upload: bool) -> FaceflError:
    """Map an unexpected HTTP status to the SDK's typed error."""
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
        retry = _parse_retry_after(resp.headers.get("Retry-After"))
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


def _parse_retry_after(value: str | None) -> float | None:
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


def _parse_time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    return datetime.fromisoformat(str(value))


def _opt_strings(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
