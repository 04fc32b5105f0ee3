"""Secure aggregation end to end: a real uvicorn server, SDK devices in threads, the `tiny` architecture
and synthetic deltas (so that the expected aggregate is known exactly)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from device_sdk import AdminClient, FederatedClient
from facefl import codec
from facefl.privacy.accountant import epsilon_spent
from facefl.secagg import fixedpoint
from server_api.db import normalize_url
from simulator.server import LocalServer
from tests.conftest import ADMIN, SECRET

pytestmark = pytest.mark.slow

EMBEDDING_DIM = 128  # tiny: a (128, 48) layer and its bias, 6,272 values per update
CLIP_NORM = 10.0
MAX_WEIGHT = 100


class Recorder(httpx.BaseTransport):
    """Every request the devices send, as (method, path, body bytes)."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        with self._lock:
            self.requests.append((request.method, request.url.path, body))
        return self._inner.handle_request(request)

    def close(self) -> None:
        """Shared by every client: closed by the test."""


class LosesFirstAnswers(Recorder):
    """Forwards each device's first POST of a secure-aggregation stage to the server, which records it,
    then raises a connection error (the stage's kind) instead of returning the answer: the device cannot
    know whether its request arrived."""

    def __init__(self, errors: dict[str, type[httpx.TransportError]]) -> None:
        super().__init__()
        self.errors = errors
        self.lost: dict[tuple[str, str], int] = {}  # (Authorization header, stage) -> the lost status

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        path = request.url.path
        stage = path.rsplit("/", 1)[-1]
        if request.method != "POST" or "/secagg/" not in path or stage not in self.errors:
            return response
        who = (request.headers["Authorization"], stage)
        with self._lock:
            first = who not in self.lost
            if first:
                self.lost[who] = response.status_code
        if not first:
            return response
        response.read()
        response.close()
        raise self.errors[stage](f"the answer to {path} was lost", request=request)


class HoldsFirstUpload(Recorder):
    """The first device to post its masked update is held back until the other ``n - 1`` uploads are in,
    then its upload goes out slowly: the headers and half the body, the rest only once the device's
    resend was told that the first is still arriving (409 ``upload_in_progress``). The device itself
    gets a read timeout as soon as the server is receiving that body (its staging file exists), so its
    resend always meets the first in flight."""

    def __init__(self, n: int, staging: Path) -> None:
        super().__init__()
        self.n, self.staging = n, staging
        self.held: str | None = None  # the Authorization header of the held device
        self.others_in = threading.Semaphore(0)
        self.release = threading.Event()
        self.first_status: int | None = None
        self.first_done = threading.Event()
        self.resends: list[int] = []  # the statuses the held device's resends got

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or not request.url.path.endswith("/secagg/masked-update"):
            return super().handle_request(request)
        who = request.headers["Authorization"]
        with self._lock:
            first = self.held is None
            if first:
                self.held = who
        if first:
            self._send_slowly(request)
            raise httpx.ReadTimeout("the answer to the first masked update was lost", request=request)
        response = super().handle_request(request)
        if who != self.held:
            self.others_in.release()
            return response
        response.read()
        self.resends.append(response.status_code)
        if response.status_code == 409:
            self.release.set()
        return response

    def _send_slowly(self, request: httpx.Request) -> None:
        for _ in range(self.n - 1):
            assert self.others_in.acquire(timeout=60)
        body = request.read()
        with self._lock:
            self.requests.append((request.method, request.url.path, body))

        def chunks() -> Iterator[bytes]:
            yield body[: len(body) // 2]
            self.release.wait(60)
            yield body[len(body) // 2 :]

        slow = httpx.Request(request.method, request.url, headers=request.headers, content=chunks())

        def send() -> None:
            response = self._inner.handle_request(slow)
            response.read()
            response.close()
            self.first_status = response.status_code
            self.first_done.set()

        threading.Thread(target=send, daemon=True).start()
        give_up = time.monotonic() + 60
        while not list(self.staging.rglob("*.part")):  # the only upload in flight: the server has it
            assert time.monotonic() < give_up, "the server never began to receive the held upload"
            time.sleep(0.01)


class SendsTamperedCopies(Recorder):
    """Right after the first device's request of each stage is answered, sends the server a copy with
    a different content (keys swapped, one byte of a body flipped) under the same tokens, and keeps the
    answer. The stage's other requests wait meanwhile (one lock per stage), so the stage is still the
    one the copy belongs to."""

    def __init__(self) -> None:
        super().__init__()
        self.stage_locks: dict[str, threading.Lock] = {}
        self.answers: dict[str, tuple[int, str]] = {}  # stage -> (status, code) of the tampered copy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        stage = request.url.path.rsplit("/", 1)[-1]
        if request.method != "POST" or "/secagg/" not in request.url.path:
            return super().handle_request(request)
        with self._lock:
            lock = self.stage_locks.setdefault(stage, threading.Lock())
        with lock:
            response = super().handle_request(request)
            if stage in self.answers or response.status_code not in (200, 202):
                return response
            body = request.read()
            if stage == "keys":
                keys = json.loads(body)
                tampered = json.dumps({"c_public": keys["s_public"], "s_public": keys["c_public"]}).encode()
            else:
                tampered = body[:-1] + bytes([body[-1] ^ 1])
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            copy = httpx.Request("POST", request.url, headers=headers, content=tampered)
            answer = self._inner.handle_request(copy)
            answer.read()
            self.answers[stage] = (answer.status_code, answer.json().get("code", ""))
            return response


class _Gone(Exception):
    """A device that goes away at a step of the protocol."""


@dataclass
class Cohort:
    server: LocalServer
    recorder: Recorder = field(default_factory=Recorder)
    creds: list[tuple[str, str]] = field(default_factory=list)

    def register(self, n: int) -> None:
        for i in range(n):
            with FederatedClient(self.server.base_url) as c:
                cr = c.register(SECRET, name=f"dev{i}")
                self.creds.append((cr.device_id, cr.token))

    def client(self, i: int) -> FederatedClient:
        device_id, token = self.creds[i]
        return FederatedClient(
            self.server.base_url, token=token, device_id=device_id, transport=self.recorder, timeout=30.0
        )

    def run(
        self,
        task_id: int,
        deltas: list[dict[str, np.ndarray]],
        weights: list[int],
        *,
        secure: bool,
        drop_at: dict[int, str] | None = None,
    ) -> dict[int, BaseException]:
        """Every device checks in (all at once: the cohort must form) and uploads its delta; returns the
        errors of the devices that raised (the dropped ones)."""
        errors: dict[int, BaseException] = {}
        drop_at = drop_at or {}

        def device(i: int) -> None:
            def step(name: str, fn: Callable[[], Any]) -> Any:
                if drop_at.get(i) == name:
                    raise _Gone(name)
                return fn()

            try:
                with self.client(i) as c:
                    a = c.wait_for_assignment(task_id, timeout_s=60)
                    if secure:
                        c.upload_secure(a, deltas[i], weights[i], step=step)
                    else:
                        c.upload_update(a, deltas[i], weights[i])
            except BaseException as exc:
                errors[i] = exc

        threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(len(deltas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        return errors


def _task(
    admin: AdminClient,
    name: str,
    n: int,
    *,
    secure: bool,
    min_reports: int,
    timeout: float = 2.0,
    dp: dict[str, Any] | None = None,
) -> int:
    policy: dict[str, Any] = {
        "target_reports": n,
        "over_selection": 1.0,
        "min_reports": min_reports,
        "round_timeout_s": 60,
        "max_sample_weight": MAX_WEIGHT,
        "update_norm_bound": "off",
    }
    if secure:
        policy["secure_aggregation"] = {"clip_norm": CLIP_NORM, "stage_timeout_s": timeout}
    if dp is not None:
        policy["dp"] = dp
    task = admin.create_task(
        name, architecture="tiny", embedding_dim=EMBEDDING_DIM, rounds=1, seed=0, policy=policy
    )
    return task.id


def _deltas(
    admin: AdminClient, version: int, n: int, seed: int
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    base = admin.download_model(version)
    rng = np.random.default_rng(seed)
    deltas = [
        {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in base.items()}
        for _ in range(n)
    ]
    for d in deltas:  # honest deltas inside the clip norm: clipping changes nothing, as in plain FedAvg
        assert codec.global_norm(d) < CLIP_NORM
    return deltas, [int(w) for w in rng.integers(1, MAX_WEIGHT + 1, size=n)]


def _current_version(admin: AdminClient, task_id: int) -> int:
    version = admin.get_task(task_id).current_version
    assert version is not None
    return version


def _result(admin: AdminClient, task_id: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(base weights, new weights) of the task's one round."""
    rnd = admin.task_rounds(task_id)[0]
    done = admin.wait_for_round(rnd.id, timeout_s=60)
    assert done.status == "aggregated", done
    assert done.result_version is not None
    return admin.download_model(done.base_version), admin.download_model(done.result_version)


def _expected_mean(
    deltas: list[dict[str, np.ndarray]], weights: list[int], members: list[int]
) -> dict[str, np.ndarray]:
    total = sum(weights[i] for i in members)
    out = {}
    for k in deltas[0]:
        acc = np.zeros(deltas[0][k].shape, np.float64)
        for i in members:
            acc += weights[i] * deltas[i][k].astype(np.float64)
        out[k] = acc / total
    return out


def _quantization_bound(devices: int, total_weight: int, max_devices: int) -> float:
    """The derived bound on |secure mean - exact mean| per coordinate (facefl.secagg.fixedpoint)."""
    bound = fixedpoint.coordinate_bound(clip_norm=CLIP_NORM, max_weight=MAX_WEIGHT, noise_stddev=0.0)
    scale = fixedpoint.quantization_scale(max_devices=max_devices, bound=bound)
    return fixedpoint.sum_error_bound(devices=devices, scale=scale) / total_weight


def _float32_slack(*arrays: np.ndarray) -> float:
    """Storing a weight as float32 rounds it by half a unit in the last place; two stored values and the
    float32 mean each contribute one such rounding."""
    biggest = max(float(np.abs(a).max()) for a in arrays)
    return 3 * float(np.spacing(np.float32(biggest)))


def _assert_secure_mean(
    deltas: list[dict[str, np.ndarray]],
    weights: list[int],
    members: list[int],
    max_devices: int,
    base: dict[str, np.ndarray],
    new: dict[str, np.ndarray],
) -> float:
    """The new version minus its base equals the members' exact weighted mean within the derived
    quantization bound (plus float32 rounding) in every coordinate; returns that bound."""
    expected = _expected_mean(deltas, weights, members)
    quant = _quantization_bound(len(members), sum(weights[i] for i in members), max_devices=max_devices)
    for k, mean in expected.items():
        got = new[k].astype(np.float64) - base[k]
        assert np.abs(got - mean).max() <= quant + _float32_slack(new[k], base[k], mean), k
    return quant


def _stored_masked_blobs(server: LocalServer, task_id: int) -> dict[str, np.ndarray]:
    engine = sa.create_engine(normalize_url(server.database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT u.device_id, u.blob_key FROM updates u JOIN rounds r ON r.id = u.round_id"
                    " WHERE r.task_id = :t"
                ),
                {"t": task_id},
            ).all()
    finally:
        engine.dispose()
    out = {}
    for device_id, key in rows:
        path = server.data_dir / "blobs" / key[:2] / key[2:4] / key
        out[str(device_id)] = codec.decode(path.read_bytes(), dtypes={"U32": np.dtype("uint32")})["masked"]
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([delta[k].astype(np.float64).ravel() for k in sorted(delta)])


def test_secure_aggregation_equals_plain_fedavg_and_hides_updates(server: LocalServer) -> None:
    n = 10
    cohort = Cohort(server)
    cohort.register(n)
    with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
        secure_task = _task(admin, "secure", n, secure=True, min_reports=n // 2)
        plain_task = _task(admin, "plain", n, secure=False, min_reports=n // 2)
        deltas, weights = _deltas(admin, _current_version(admin, secure_task), n, seed=1)
        assert cohort.run(secure_task, deltas, weights, secure=True) == {}
        assert cohort.run(plain_task, deltas, weights, secure=False) == {}
        base_s, new_s = _result(admin, secure_task)
        base_p, new_p = _result(admin, plain_task)

    expected = _expected_mean(deltas, weights, list(range(n)))
    quant = _quantization_bound(n, sum(weights), max_devices=n)
    for k, mean in expected.items():
        secure_delta = new_s[k].astype(np.float64) - base_s[k]
        plain_delta = new_p[k].astype(np.float64) - base_p[k]
        slack = _float32_slack(new_s[k], base_s[k], mean)
        assert np.abs(secure_delta - mean).max() <= quant + slack, k
        assert np.abs(secure_delta - plain_delta).max() <= quant + 2 * slack, k

    # what the server stored for the secure round looks like uniform noise next to each true delta
    stored = _stored_masked_blobs(server, secure_task)
    ids = [device_id for device_id, _ in cohort.creds]
    assert sorted(stored) == sorted(ids)
    for i, device_id in enumerate(ids):
        masked = stored[device_id].view(np.int32)[:-1]  # as signed integers, without the weight
        assert len(masked) == len(_flat(deltas[i])) > 6000
        assert abs(_cosine(masked, _flat(deltas[i]))) < 0.1

    # and no request of the secure round carried an unmasked update: no plain upload, and none of the
    # delta's float32 bytes (any 8 consecutive values) in any body
    plain_uploads = [p for m, p, _ in cohort.recorder.requests if m == "POST" and p.endswith("/updates")]
    assert len(plain_uploads) == n  # the plain task's only
    for i in range(n):
        probe = _flat(deltas[i]).astype(np.float32)[:8].tobytes()
        assert not any(probe in body for m, p, body in cohort.recorder.requests if "/secagg" in p)
    masked_posts = [body for m, p, body in cohort.recorder.requests if p.endswith("/secagg/masked-update")]
    assert len(masked_posts) == n
    for body in masked_posts:
        masked = codec.decode(body, dtypes={"U32": np.dtype("uint32")})["masked"].view(np.int32)[:-1]
        assert max(abs(_cosine(masked, _flat(d))) for d in deltas) < 0.1


def test_dropouts_at_every_stage_still_aggregate(server: LocalServer) -> None:
    n = 20  # threshold 10 of 19 neighbours; 3 leave after keys, 3 after shares, 3 after uploading
    cohort = Cohort(server)
    cohort.register(n)
    drop_at = {0: "secagg_shares", 1: "secagg_shares", 2: "secagg_shares"}
    drop_at |= {3: "secagg_upload", 4: "secagg_upload", 5: "secagg_upload"}
    drop_at |= {6: "secagg_reveal", 7: "secagg_reveal", 8: "secagg_reveal"}
    with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
        # each stage waits out its deadline for the leavers: long enough that 20 honest devices on a loaded
        # 2-core machine (make test runs two test files at once) are never mistaken for leavers
        task_id = _task(admin, "dropouts", n, secure=True, min_reports=10, timeout=4.0)
        deltas, weights = _deltas(admin, _current_version(admin, task_id), n, seed=2)
        errors = cohort.run(task_id, deltas, weights, secure=True, drop_at=drop_at)
        assert sorted(errors) == sorted(drop_at)
        assert all(isinstance(e, _Gone) for e in errors.values())
        base, new = _result(admin, task_id)
    # the sum holds every device whose masked update arrived, including those gone before unmasking
    uploaded = [i for i in range(n) if drop_at.get(i) not in ("secagg_shares", "secagg_upload")]
    assert len(uploaded) == 14
    quant = _assert_secure_mean(deltas, weights, uploaded, n, base, new)
    assert math.isfinite(quant)


def test_distributed_dp_the_devices_noise_adds_up_to_the_central_mechanism(server: LocalServer) -> None:
    """policy.dp under secure aggregation: zero updates, so the new version minus the base is the noise
    alone. Each of n devices adds N(0, (zC)^2 / m) (m = min_reports) with weight 1, so the mean's noise has
    standard deviation zC / sqrt(n m); the round is accounted like central DP-FedAvg."""
    n, m, z, clip, population = 10, 5, 1.0, 0.5, 100
    cohort = Cohort(server)
    cohort.register(n)
    dp = {"clip_norm": clip, "noise_multiplier": z, "population": population}
    with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
        task_id = _task(admin, "dp", n, secure=True, min_reports=m, dp=dp)
        base = admin.download_model(_current_version(admin, task_id))
        zeros = [{k: np.zeros_like(v) for k, v in base.items()} for _ in range(n)]
        assert cohort.run(task_id, zeros, [7] * n, secure=True) == {}
        base, new = _result(admin, task_id)
        rnd = admin.task_rounds(task_id)[0]
        task = admin.get_task(task_id)
    noise = np.concatenate([(new[k].astype(np.float64) - base[k]).ravel() for k in base])
    expected = z * clip / math.sqrt(n * m)
    # 6,272 draws: the sample standard deviation is within 5 % of the true one with overwhelming probability
    assert abs(noise.std() / expected - 1) < 0.05
    assert abs(noise.mean()) < 5 * expected / math.sqrt(len(noise))
    assert rnd.metrics["dp_epsilon"] == pytest.approx(epsilon_spent(n / population, z, 1, 1e-5))
    assert task.raw["privacy"]["noise_added_by"] == "devices"


def test_lost_answers_at_every_stage_are_resent_and_every_device_is_aggregated(
    server: LocalServer,
) -> None:
    """Every device loses the answer to its first request of each stage (the server recorded it; the
    last one of each stage also closed it): the SDK sends it again, the server answers from the record,
    and the round aggregates with every device (min_reports = n: a device left out abandons it)."""
    n = 4
    lossy = LosesFirstAnswers(
        {
            "keys": httpx.ReadError,
            "shares": httpx.ReadTimeout,
            "masked-update": httpx.RemoteProtocolError,
            "reveal": httpx.ReadError,
        }
    )
    cohort = Cohort(server, recorder=lossy)
    cohort.register(n)
    with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
        task_id = _task(admin, "resend", n, secure=True, min_reports=n, timeout=30.0)
        deltas, weights = _deltas(admin, _current_version(admin, task_id), n, seed=3)
        assert cohort.run(task_id, deltas, weights, secure=True) == {}
        base, new = _result(admin, task_id)
        rnd = admin.task_rounds(task_id)[0]
    # each device's first request of each stage was recorded (2xx) and its answer lost
    tokens = {f"Bearer {token}" for _, token in cohort.creds}
    assert sorted(lossy.lost) == sorted((t, s) for t in tokens for s in lossy.errors)
    assert set(lossy.lost.values()) <= {200, 202}, lossy.lost
    for stage in lossy.errors:  # sent twice by every device, not more
        posts = [p for m, p, _ in lossy.requests if m == "POST" and p.endswith(f"/secagg/{stage}")]
        assert len(posts) == 2 * n, stage
    assert rnd.reported == n
    _assert_secure_mean(deltas, weights, list(range(n)), n, base, new)


def test_a_resend_that_meets_the_first_upload_still_arriving_waits_for_it(server: LocalServer) -> None:
    """The device's read timeout fires while the server is still receiving its masked update: the resend
    is told 409 upload_in_progress, the SDK sends it again until the first is recorded, and that resend
    is answered from the record; the round aggregates with every device."""
    n = 3
    held = HoldsFirstUpload(n, server.data_dir / "blobs" / "staging")
    cohort = Cohort(server, recorder=held)
    cohort.register(n)
    with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
        task_id = _task(admin, "in-flight", n, secure=True, min_reports=n, timeout=30.0)
        deltas, weights = _deltas(admin, _current_version(admin, task_id), n, seed=4)
        assert cohort.run(task_id, deltas, weights, secure=True) == {}
        _result(admin, task_id)  # aggregated
        rnd = admin.task_rounds(task_id)[0]
    assert held.first_done.wait(30) and held.first_status == 202
    assert held.resends[0] == 409 and held.resends[-1] == 202, held.resends
    assert rnd.reported == n


def test_a_resend_with_different_content_is_refused_and_changes_nothing(server: LocalServer) -> None:
    """Each stage's first request is followed by a copy with another content: refused (409), and the
    round still aggregates to the exact mean of the devices' own updates (a swapped key, or a flipped
    byte of a share, a masked update or a revealed share taken in, would break the unmasking)."""
    n = 3
    tamper = SendsTamperedCopies()
    cohort = Cohort(server, recorder=tamper)
    cohort.register(n)
    with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
        task_id = _task(admin, "tampered", n, secure=True, min_reports=n, timeout=30.0)
        deltas, weights = _deltas(admin, _current_version(admin, task_id), n, seed=5)
        assert cohort.run(task_id, deltas, weights, secure=True) == {}
        base, new = _result(admin, task_id)
    assert tamper.answers == {
        "keys": (409, "already_done"),
        "shares": (409, "already_done"),
        "masked-update": (409, "conflict"),
        "reveal": (409, "already_done"),
    }
    _assert_secure_mean(deltas, weights, list(range(n)), n, base, new)
