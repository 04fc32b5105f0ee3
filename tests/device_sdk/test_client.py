"""FederatedClient: retries/backoff at the transport level (injected transport), and the protocol against a
real server (uvicorn on 127.0.0.1 with a temporary SQLite file)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_sdk import (
    Assignment,
    AssignmentTimeout,
    AuthError,
    DuplicateUpload,
    FederatedClient,
    InvalidRequest,
    LocalDataset,
    NotFound,
    ProtocolError,
    RateLimited,
    RoundClosed,
    ServerError,
    TaskCompleted,
    Trainer,
    TransportError,
    UpdateRejected,
    WaitInstruction,
    run_round,
)
from device_sdk.transport import error_for
from facefl import codec
from tests.device_sdk.conftest import create_task

# ------------------------------------------------------------------------ transport-level behaviour


class Scripted:
    """An injected transport answering from a script of callables (one per request), counting calls."""

    def __init__(self, *steps: Callable[[httpx.Request], httpx.Response]) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps[min(len(self.requests), len(self.steps)) - 1]
        return step(request)


def status(
    code: int, json: Any = None, headers: dict[str, str] | None = None
) -> Callable[..., httpx.Response]:
    return lambda request: httpx.Response(
        code, json=json if json is not None else {"detail": "x"}, headers=headers
    )


def raise_(exc_type: type[httpx.TransportError]) -> Callable[..., httpx.Response]:
    def step(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return step


ROUND_JSON = {
    "id": 1, "task_id": 1, "number": 1, "status": "open", "base_version": 1, "result_version": None,
    "target_reports": 2, "min_reports": 1, "max_assignments": 3, "assigned": 0, "reported": 0,
    "opened_at": "2026-01-01T00:00:00", "deadline": "2026-01-01T00:10:00", "closed_at": None, "metrics": {},
}  # fmt: skip
ASSIGNMENT = Assignment(
    round_id=1, task_id=1, round_number=1, base_version=1, algorithm="fedavg", architecture="small",
    embedding_dim=128, image_size=64, hyperparams={}, deadline=None, upload_token="u",
)  # fmt: skip


def scripted_client(script: Scripted, **kwargs: Any) -> tuple[FederatedClient, list[float]]:
    sleeps: list[float] = []
    client = FederatedClient(
        "http://sdk.invalid",
        token="t",
        transport=httpx.MockTransport(script),
        sleep=sleeps.append,
        rng=random.Random(0),
        **kwargs,
    )
    return client, sleeps


def test_default_timeout_is_finite() -> None:
    with FederatedClient("http://sdk.invalid") as client:
        timeout = client.timeout
        assert (
            timeout.connect == 5.0 and timeout.read == 30.0 and timeout.write == 30.0 and timeout.pool == 30.0
        )


def test_get_is_retried_on_5xx_with_growing_jittered_backoff() -> None:
    script = Scripted(status(503))
    client, sleeps = scripted_client(script, max_retries=3, backoff_base_s=0.5)
    with client, pytest.raises(ServerError) as info:
        client.get_round(1)
    assert info.value.status_code == 503
    assert len(script.requests) == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):  # equal jitter: uniform in [d/2, d], d = 0.5 * 2^attempt
        d = 0.5 * 2**attempt
        assert d / 2 <= delay <= d


def test_get_recovers_after_transient_failures() -> None:
    script = Scripted(status(502), raise_(httpx.ReadTimeout), status(200, ROUND_JSON))
    client, sleeps = scripted_client(script)
    with client:
        info = client.get_round(1)
    assert info.id == 1 and info.status == "open"
    assert len(script.requests) == 3 and len(sleeps) == 2
    assert client.stats.retries == 2


def test_retry_after_header_of_a_5xx_is_honoured() -> None:
    script = Scripted(status(503, headers={"Retry-After": "7"}), status(200, ROUND_JSON))
    client, sleeps = scripted_client(script)
    with client:
        client.get_round(1)
    assert sleeps and sleeps[0] >= 7.0


def test_connection_failure_of_a_get_is_retried_then_raised_as_transport_error() -> None:
    script = Scripted(raise_(httpx.ConnectError))
    client, sleeps = scripted_client(script, max_retries=2)
    with client, pytest.raises(TransportError):
        client.download_model(1)
    assert len(script.requests) == 3 and len(sleeps) == 2


def test_checkin_is_retried_on_5xx() -> None:
    wait = {"action": "wait", "retry_after_s": 1.5, "reason": "no_open_round"}
    script = Scripted(status(500), status(200, wait))
    client, _ = scripted_client(script)
    with client:
        answer = client.checkin(1)
    assert answer == WaitInstruction(retry_after_s=1.5, reason="no_open_round")
    assert len(script.requests) == 2


def test_upload_is_not_retried_once_the_request_may_have_been_sent() -> None:
    delta = {"w": np.zeros(3, np.float32)}
    for failure in (raise_(httpx.ReadTimeout), raise_(httpx.WriteError), status(503)):
        script = Scripted(failure, status(202, {"update_id": 1, "round_id": 1, "reports": 1}))
        client, sleeps = scripted_client(script)
        with client, pytest.raises((TransportError, ServerError)):
            client.upload_update(ASSIGNMENT, delta, num_samples=3)
        assert len(script.requests) == 1 and sleeps == []


def test_upload_is_retried_when_the_connection_could_not_be_made() -> None:
    script = Scripted(raise_(httpx.ConnectError), status(202, {"update_id": 9, "round_id": 1, "reports": 1}))
    client, sleeps = scripted_client(script)
    with client:
        receipt = client.upload_update(ASSIGNMENT, {"w": np.zeros(3, np.float32)}, num_samples=3)
    assert receipt.update_id == "9" and len(script.requests) == 2 and len(sleeps) == 1


def test_registration_is_not_retried_on_5xx() -> None:
    script = Scripted(status(500))
    client, sleeps = scripted_client(script)
    with client, pytest.raises(ServerError):
        client.register("secret")
    assert len(script.requests) == 1 and sleeps == []


def test_non_json_answer_is_a_protocol_error() -> None:
    script = Scripted(lambda request: httpx.Response(200, content=b"<html>proxy</html>"))
    client, _ = scripted_client(script)
    with client, pytest.raises(ProtocolError):
        client.get_task(1)


@pytest.mark.parametrize(
    ("code", "upload", "expected"),
    [
        (401, False, AuthError),
        (403, True, AuthError),
        (404, False, NotFound),
        (409, True, DuplicateUpload),
        (410, True, RoundClosed),
        (413, True, UpdateRejected),
        (422, True, UpdateRejected),
        (422, False, InvalidRequest),
        (429, False, RateLimited),
        (500, False, ServerError),
        (504, True, ServerError),
    ],
)
def test_status_codes_map_to_typed_errors(code: int, upload: bool, expected: type[Exception]) -> None:
    request = httpx.Request("POST", "http://sdk.invalid/v1/x")
    response = httpx.Response(
        code, json={"detail": "why", "code": "some_code"}, headers={"Retry-After": "3"}, request=request
    )
    error = error_for(response, upload=upload)
    assert type(error) is expected
    assert error.status_code == code and error.detail == "why" and error.code == "some_code"  # type: ignore[attr-defined]
    if isinstance(error, RateLimited):
        assert error.retry_after == 3.0


# ---------------------------------------------------------------------------- against a real server


class Recorder(httpx.BaseTransport):
    """Forwards to the real network transport and records every request (with its body) and status."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.log: list[tuple[httpx.Request, bytes, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        response = self.inner.handle_request(request)
        self.log.append((request, body, response.status_code))
        return response

    def close(self) -> None:
        self.inner.close()


def new_device(base_url: str, secret: str, **kwargs: Any) -> FederatedClient:
    client = FederatedClient(base_url, **kwargs)
    client.register(secret, name="pytest-phone", capabilities={"accelerator": "cpu", "num_samples": 10})
    return client


def zero_delta(weights: dict[str, np.ndarray], value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value, dtype=np.float32) for k, v in weights.items()}


def test_registration_with_a_wrong_secret_is_refused(live_server: tuple[str, str, str]) -> None:
    base_url, _, _ = live_server
    with FederatedClient(base_url) as client, pytest.raises(AuthError) as info:
        client.register("not-the-secret")
    assert info.value.status_code == 401 and client.token is None


def test_forged_device_token_is_refused(live_server: tuple[str, str, str]) -> None:
    base_url, admin, _ = live_server
    task = create_task(base_url, admin)
    with FederatedClient(base_url, token="forged-token") as client, pytest.raises(AuthError) as info:
        client.checkin(task.id)
    assert info.value.status_code == 401


def test_checkin_download_upload_and_status(live_server: tuple[str, str, str], tmp_path: Path) -> None:
    base_url, admin, secret = live_server
    task = create_task(base_url, admin, policy={"target_reports": 2, "min_reports": 1})
    recorder = Recorder()
    with new_device(base_url, secret, transport=recorder, cache_dir=tmp_path / "cache") as client:
        assert client.device_id and client.token
        answer = client.checkin(task.id)
        assert isinstance(answer, Assignment)
        assert answer.task_id == task.id and answer.base_version == task.current_version
        assert answer.architecture == "small" and answer.image_size == 64 and answer.deadline is not None

        weights = client.download_model(answer.base_version)
        again = client.download_model(answer.base_version)  # revalidated: 304, served from the cache
        assert weights.keys() == again.keys()
        assert all(np.array_equal(weights[k], again[k]) for k in weights)
        model_statuses = [s for r, _, s in recorder.log if r.url.path.startswith("/v1/models/")]
        assert model_statuses == [200, 304]

        receipt = client.upload_update(
            answer, zero_delta(weights, 0.001), num_samples=10, metrics={"loss": 1.5}
        )
        assert receipt.round_id == answer.round_id and receipt.reports == 1
        assert receipt.bytes_sent == len(codec.encode(zero_delta(weights)))

        with pytest.raises(DuplicateUpload) as dup:
            client.upload_update(answer, zero_delta(weights), num_samples=10)
        assert dup.value.status_code == 409

        info = client.get_round(answer.round_id)
        assert info.status == "open" and info.reported == 1 and info.assigned == 1
        task_info = client.get_task(task.id)
        assert task_info.current_round is not None and task_info.current_round.id == answer.round_id
        with pytest.raises(NotFound):
            client.get_round(10**9)
        with pytest.raises(NotFound):
            client.download_model(10**9)


def test_refused_updates_raise_update_rejected(live_server: tuple[str, str, str]) -> None:
    base_url, admin, secret = live_server
    task = create_task(base_url, admin, policy={"target_reports": 3, "min_reports": 1, "over_selection": 2.0})
    with new_device(base_url, secret) as client, new_device(base_url, secret) as other:
        a = client.checkin(task.id)
        b = other.checkin(task.id)
        assert isinstance(a, Assignment) and isinstance(b, Assignment)
        weights = client.download_model(a.base_version)

        wrong_shape = zero_delta(weights)
        name = next(iter(wrong_shape))
        wrong_shape[name] = np.zeros((*wrong_shape[name].shape, 2), np.float32)
        with pytest.raises(UpdateRejected) as info:
            client.upload_update(a, wrong_shape, num_samples=5)
        assert info.value.status_code == 422 and info.value.code and info.value.detail

        missing = dict(list(zero_delta(weights).items())[1:])
        with pytest.raises(UpdateRejected):
            client.upload_update(a, missing, num_samples=5)

        nan = zero_delta(weights)
        nan[name] = np.full_like(nan[name], np.nan)
        with pytest.raises(UpdateRejected):
            client.upload_update(a, nan, num_samples=5)

        # another device's upload token: forbidden
        stolen = Assignment(**{**a.__dict__, "upload_token": b.upload_token})
        with pytest.raises(AuthError) as forbidden:
            client.upload_update(stolen, zero_delta(weights), num_samples=5)
        assert forbidden.value.status_code == 403

        # nothing above was stored: the genuine upload is still accepted
        receipt = client.upload_update(a, zero_delta(weights, 0.001), num_samples=5)
        assert receipt.reports == 1


def test_late_upload_after_the_round_closed_is_round_closed(live_server: tuple[str, str, str]) -> None:
    base_url, admin, secret = live_server
    task = create_task(base_url, admin, policy={"target_reports": 1, "min_reports": 1, "over_selection": 2.0})
    with new_device(base_url, secret) as fast, new_device(base_url, secret) as slow:
        a = fast.checkin(task.id)
        b = slow.checkin(task.id)
        assert isinstance(a, Assignment) and isinstance(b, Assignment) and a.round_id == b.round_id
        weights = fast.download_model(a.base_version)
        fast.upload_update(a, zero_delta(weights, 0.001), num_samples=5)  # reaches the target: closes
        with pytest.raises(RoundClosed) as info:
            slow.upload_update(b, zero_delta(weights, 0.001), num_samples=5)
        assert info.value.status_code == 410


def test_wait_for_assignment_honours_pace_steering_and_times_out(live_server: tuple[str, str, str]) -> None:
    base_url, admin, secret = live_server
    task = create_task(base_url, admin, policy={"target_reports": 2, "min_reports": 1})
    now = [0.0]
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    with new_device(base_url, secret, sleep=fake_sleep, clock=lambda: now[0]) as client:
        a = client.wait_for_assignment(task.id, timeout_s=5)
        assert sleeps == []  # an open round: assigned at once
        client.upload_update(a, zero_delta(client.download_model(a.base_version)), num_samples=3)
        answer = client.checkin(task.id)
        assert isinstance(answer, WaitInstruction) and answer.reason == "already_participated"
        with pytest.raises(AssignmentTimeout) as info:
            client.wait_for_assignment(task.id, timeout_s=100, rng=random.Random(1))
        assert info.value.last_reason == "already_participated"
        # never sooner than the server asked, at most 20 % later; the last sleep is cut at the budget
        assert answer.retry_after_s <= sleeps[0] <= 1.2 * answer.retry_after_s or sleeps[0] == 100
        assert sum(sleeps) == pytest.approx(100)


def test_wait_for_assignment_stops_when_the_task_is_completed(live_server: tuple[str, str, str]) -> None:
    base_url, admin, secret = live_server
    task = create_task(base_url, admin, rounds=1)
    with new_device(base_url, secret) as first, new_device(base_url, secret, sleep=lambda s: None) as second:
        a = first.wait_for_assignment(task.id, timeout_s=10)
        first.upload_update(a, zero_delta(first.download_model(a.base_version)), num_samples=3)
        with pytest.raises(TaskCompleted):
            second.wait_for_assignment(task.id, timeout_s=30)
        assert first.get_task(task.id).status == "completed"


def test_a_round_sends_only_the_delta_and_never_the_images(
    live_server: tuple[str, str, str], tmp_path: Path
) -> None:
    """Record every byte the device puts on the wire during a full round: no image data, no head."""
    base_url, admin, secret = live_server
    task = create_task(base_url, admin, policy={"target_reports": 1, "min_reports": 1})
    dataset = LocalDataset.synthetic([3, 4, 5], images_per_identity=4, image_size=64, seed=0)
    recorder = Recorder()
    with FederatedClient(base_url) as enroll:
        creds = enroll.register(secret)
    with FederatedClient(
        base_url, token=creds.token, device_id=creds.device_id, transport=recorder
    ) as client:
        report = run_round(client, Trainer(device="cpu"), dataset, tmp_path / "state", task.id, seed=0)
        assert report.receipt.reports == 1 and report.num_samples == len(dataset)
        deadline = time.monotonic() + 30
        while (
            not (closed := client.get_round(report.assignment.round_id)).closed
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)  # aggregation runs after the 202, off the request path
        base_names = set(client.download_model(report.assignment.base_version))
    assert closed.status == "aggregated" and closed.result_version is not None

    paths = [(r.method, r.url.path) for r, _, _ in recorder.log]
    round_id = report.assignment.round_id
    assert paths[:3] == [
        ("POST", "/v1/checkin"),
        ("GET", f"/v1/models/{report.assignment.base_version}"),
        ("POST", f"/v1/rounds/{round_id}/updates"),
    ]
    upload_body = recorder.log[2][1]
    assert set(codec.decode(upload_body)) == base_names
    sent = b"".join(body for _, body, _ in recorder.log) + b"".join(
        str(r.url).encode() + b"".join(k + v for k, v in r.headers.raw) for r, _, _ in recorder.log
    )
    for image in dataset.images:  # no row of any image appears anywhere in what was sent
        for row in image[::8]:
            assert row.tobytes() not in sent
    head_rows = (tmp_path / "state" / "local_head.safetensors").read_bytes()[-64:]
    assert head_rows not in sent


def test_429_is_retried_after_retry_after_even_for_uploads() -> None:
    calls: list[str] = []

    def script(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(
                429, json={"detail": "slow down", "code": "rate_limited"}, headers={"Retry-After": "2"}
            )
        return httpx.Response(202, json={"update_id": 7, "round_id": 1, "reports": 1})

    client, sleeps = scripted_client(script)
    receipt = client.upload_update(ASSIGNMENT, {"w": np.zeros(2, np.float32)}, num_samples=1)
    assert receipt.update_id == "7" and len(calls) == 2
    assert len(sleeps) == 1 and 2.0 <= sleeps[0] <= 2.4  # the advised wait, plus at most 20 % jitter


def test_503_busy_is_retried_for_uploads_but_another_503_is_not() -> None:
    calls: list[str] = []

    def script(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:  # refused before the body was read: safe to send again
            return httpx.Response(
                503, json={"detail": "too many uploads", "code": "busy"}, headers={"Retry-After": "1"}
            )
        if len(calls) == 2:  # any other 503 of an upload may have been processed: not resent
            return httpx.Response(503, json={"detail": "down", "code": "unavailable"})
        return httpx.Response(202, json={"update_id": 7, "round_id": 1, "reports": 1})

    client, sleeps = scripted_client(script)
    with pytest.raises(ServerError):
        client.upload_update(ASSIGNMENT, {"w": np.zeros(2, np.float32)}, num_samples=1)
    assert len(calls) == 2 and len(sleeps) == 1 and 1.0 <= sleeps[0] <= 1.2


def test_429_beyond_the_retries_raises_rate_limited() -> None:
    def script(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, json={"detail": "slow down", "code": "rate_limited"}, headers={"Retry-After": "1"}
        )

    client, sleeps = scripted_client(script, max_retries=2)
    with pytest.raises(RateLimited) as info:
        client.get_round(1)
    assert info.value.retry_after == 1.0 and len(sleeps) == 2
