"""One simulated device's round, run in a worker process: check in, download, train, upload.

Everything a job needs is in its :class:`DeviceJob` (picklable) or on disk under the device's directory
(credentials and the local-head state), so any worker process can run any device in any round.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from device_sdk import (
    Assignment,
    DeviceCredentials,
    DuplicateUpload,
    FaceflError,
    FederatedClient,
    LocalDataset,
    RoundClosed,
    ServerError,
    Trainer,
    TrainResult,
    TransportError,
    fetch_round_inputs,
)

from .faults import DeviceFault, corrupt_payload

__all__ = [
    "DataSpec",
    "DeviceJob",
    "JobResult",
    "init_worker",
    "load_device_data",
    "run_device_job",
    "warm_up",
]

# statuses of a job
UPLOADED = "uploaded"  # trained and the server accepted the update (202)
DROPPED = "dropped"  # trained, then went away without uploading (simulated dropout)
NOT_SELECTED = "not_selected"  # the server said "round full" / "already participated" / "task completed"
LATE = "late"  # the expected round had closed; the device was offered a later round and declined
ROUND_CLOSED = "round_closed"  # the upload arrived after the round closed (410)
FAILED = "failed"  # any other error (message in JobResult.error)
CORRUPT_REFUSED = "corrupt_refused"  # uploaded a corrupt update (simulated fault); the server said 4xx
CORRUPT_ACCEPTED = "corrupt_accepted"  # uploaded a corrupt update and the server accepted it: a bug

_T = TypeVar("_T")


@dataclass(frozen=True)
class DataSpec:
    """Where a device's images come from: generated identities, or identity folders of a directory."""

    kind: str  # "synthetic" | "folder"
    identities: tuple[str, ...] | tuple[int, ...]
    image_size: int
    images_per_identity: int | None
    seed: int = 0
    root: str | None = None
    test_fraction: float = 0.0  # folder data: train on the rest of each identity's images only


@dataclass(frozen=True)
class DeviceJob:
    base_url: str
    task_id: int
    device_index: int
    device_dir: str
    data: DataSpec
    expected_round_id: int | None
    seed: int
    assignment_timeout_s: float = 60.0
    drop_after_training: bool = False
    http_timeout_s: float = 60.0
    fault: DeviceFault | None = None  # simulated fault of this device in this round (simulator.faults)
    # keep retrying transport errors and 5xx answers for this long (a server being restarted)
    outage_tolerance_s: float = 0.0


@dataclass
class JobResult:
    device_index: int
    status: str
    round_id: int | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    num_samples: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0  # the whole job
    phases: dict[str, float] = field(default_factory=dict)  # checkin, download, train, upload seconds
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    fault: str = "none"  # the simulated fault's kind: none | dropout | straggler | corrupt
    upload_status: int | None = None  # HTTP status of a corrupt upload


_DATA_CACHE: dict[DataSpec, LocalDataset] = {}


def init_worker() -> None:
    """Process initializer: one intra-op thread per worker (the pool provides the parallelism)."""
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only allowed once per process
        torch.set_num_interop_threads(1)


def warm_up() -> None:
    """A no-op job: submitting one per worker starts the processes (and their imports) early."""


def load_device_data(spec: DataSpec) -> LocalDataset:
    """The device's local dataset, deterministic in ``spec`` (cached per worker process)."""
    cached = _DATA_CACHE.get(spec)
    if cached is not None:
        return cached
    if spec.kind == "synthetic":
        ids = [int(i) for i in spec.identities]
        dataset = LocalDataset.synthetic(ids, spec.images_per_identity or 10, spec.image_size, spec.seed)
    elif spec.kind == "folder":
        assert spec.root is not None
        dataset = LocalDataset.from_folder(
            spec.root,
            spec.image_size,
            identities=[str(i) for i in spec.identities],
            max_images_per_identity=spec.images_per_identity,
        )
        if spec.test_fraction > 0:
            dataset, _test = dataset.train_test_split(spec.test_fraction, spec.seed)
    else:
        raise ValueError(f"unknown data kind {spec.kind!r}")
    if len(_DATA_CACHE) > 256:
        _DATA_CACHE.clear()
    _DATA_CACHE[spec] = dataset
    return dataset


def run_device_job(job: DeviceJob) -> JobResult:
    """Run one device for one round; never raises for protocol outcomes (they are the result's status)."""
    started = time.perf_counter()
    result = JobResult(device_index=job.device_index, status=FAILED)
    device_dir = Path(job.device_dir)
    rng = random.Random(job.seed)
    try:
        creds = DeviceCredentials.load(device_dir / "credentials.json")
        dataset = load_device_data(job.data)
        result.num_samples = len(dataset)
        client = FederatedClient(
            job.base_url,
            token=creds.token,
            device_id=creds.device_id,
            timeout=job.http_timeout_s,
            rng=rng,
            backoff_base_s=0.1,
            backoff_cap_s=2.0,
            # shared by the simulated devices of a run: FedFR's public pack is downloaded once
            cache_dir=device_dir.parent.parent / "cache",
        )
        with client:
            try:
                mark = time.perf_counter()

                def phase(name: str) -> None:
                    nonlocal mark
                    now = time.perf_counter()
                    result.phases[name] = now - mark
                    mark = now

                fault = job.fault or DeviceFault()
                result.fault = fault.kind
                assignment = _checkin_for_round(client, job, rng, result)
                phase("checkin")
                if assignment is not None and fault.drop_after == "checkin":
                    result.status = DROPPED
                elif assignment is not None:
                    version = assignment.base_version
                    base = _outage_retry(job, rng, lambda: client.download_model(version))
                    inputs = _outage_retry(job, rng, lambda: fetch_round_inputs(client, assignment))
                    phase("download")
                    if fault.drop_after == "download":
                        result.status = DROPPED
                        return _finish(result, started)
                    trained = Trainer().train(
                        assignment, base, dataset, device_dir / "state", seed=job.seed, inputs=inputs
                    )
                    phase("train")
                    result.train_seconds = trained.seconds
                    result.metrics = trained.metrics
                    if fault.slow_factor > 1.0:  # a straggler: training took slow_factor times longer
                        time.sleep((fault.slow_factor - 1.0) * trained.seconds)
                        phase("straggle")
                    if job.drop_after_training or fault.drop_after == "train":
                        result.status = DROPPED
                    elif fault.corrupt is not None:
                        body = corrupt_payload(fault.corrupt, trained.delta, job.seed)
                        result.upload_status = _upload_raw(client, creds.token, assignment, body, job)
                        phase("upload")
                        ok = 400 <= result.upload_status < 500
                        result.status = CORRUPT_REFUSED if ok else CORRUPT_ACCEPTED
                    else:
                        _upload_with_retries(client, job, rng, assignment, trained)
                        phase("upload")
                        result.status = UPLOADED
            except RoundClosed as exc:
                result.status = ROUND_CLOSED
                result.error = str(exc)
            finally:
                result.bytes_sent = client.stats.bytes_sent
                result.bytes_received = client.stats.bytes_received
    except FaceflError as exc:
        result.status = FAILED
        result.error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # report, do not kill the pool: the main process decides what to do
        result.status = FAILED
        result.error = f"{type(exc).__name__}: {exc}"
    return _finish(result, started)


def _finish(result: JobResult, started: float) -> JobResult:
    result.seconds = time.perf_counter() - started
    return result


def _outage_retry(job: DeviceJob, rng: random.Random, call: Callable[[], _T]) -> _T:
    """``call()``, retried on transport errors and 5xx answers for ``job.outage_tolerance_s``."""
    deadline = time.monotonic() + job.outage_tolerance_s
    delay = 0.2
    while True:
        try:
            return call()
        except (TransportError, ServerError):
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay * (1.0 + 0.2 * rng.random()))
            delay = min(2.0 * delay, 2.0)


def _upload_with_retries(
    client: FederatedClient, job: DeviceJob, rng: random.Random, assignment: Assignment, trained: TrainResult
) -> None:
    """Upload; after a transport failure (the server may have died mid-request) send it again: a 409
    then means the first attempt was committed, which is success."""
    delta, num_samples, metrics = trained.delta, trained.num_samples, trained.metrics
    attempts = 0

    def once() -> None:
        nonlocal attempts
        attempts += 1
        try:
            client.upload_update(assignment, delta, num_samples, metrics)
        except DuplicateUpload:
            if attempts == 1:
                raise

    _outage_retry(job, rng, once)


def _upload_raw(
    client: FederatedClient, token: str, assignment: Assignment, body: bytes, job: DeviceJob
) -> int:
    """POST ``body`` as the update (a simulated corrupt upload); returns the HTTP status."""
    url = f"{job.base_url.rstrip('/')}/v1/rounds/{assignment.round_id}/updates"
    headers = {
        "Authorization": f"Bearer {token}",
        "X-Upload-Token": assignment.upload_token,
        "Content-Type": "application/octet-stream",
    }
    resp = httpx.post(
        url, params={"num_samples": 1}, content=body, headers=headers, timeout=job.http_timeout_s
    )
    client.stats.bytes_sent += len(body)
    return resp.status_code


def _checkin_for_round(
    client: FederatedClient, job: DeviceJob, rng: random.Random, result: JobResult
) -> Assignment | None:
    """Check in until assigned to the expected round; None (with result.status set) otherwise."""
    deadline = time.monotonic() + job.assignment_timeout_s
    capabilities = {"accelerator": "cpu", "num_samples": result.num_samples}
    while True:
        answer = _outage_retry(job, rng, lambda: client.checkin(job.task_id, capabilities))
        if isinstance(answer, Assignment):
            result.round_id = answer.round_id
            if job.expected_round_id is not None and answer.round_id != job.expected_round_id:
                result.status = LATE
                return None
            return answer
        if answer.reason != "no_open_round":
            result.status = NOT_SELECTED
            result.error = answer.reason
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            result.status = FAILED
            result.error = f"no open round within {job.assignment_timeout_s:g} s"
            return None
        time.sleep(min(remaining, answer.retry_after_s * (1.0 + 0.2 * rng.random())))
