"""One simulated device's round, run in a worker process: check in, download, train, upload.

Everything a job needs is in its :class:`DeviceJob` (picklable) or on disk under the device's directory
(credentials and the local-head state), so any worker process can run any device in any round.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from device_sdk import (
    Assignment,
    DeviceCredentials,
    FaceflError,
    FederatedClient,
    LocalDataset,
    RoundClosed,
    Trainer,
    fetch_round_inputs,
)

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

                assignment = _checkin_for_round(client, job, rng, result)
                phase("checkin")
                if assignment is not None:
                    base = client.download_model(assignment.base_version)
                    inputs = fetch_round_inputs(client, assignment)
                    phase("download")
                    trained = Trainer().train(
                        assignment, base, dataset, device_dir / "state", seed=job.seed, inputs=inputs
                    )
                    phase("train")
                    result.train_seconds = trained.seconds
                    result.metrics = trained.metrics
                    if job.drop_after_training:
                        result.status = DROPPED
                    else:
                        client.upload_update(assignment, trained.delta, trained.num_samples, trained.metrics)
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
    result.seconds = time.perf_counter() - started
    return result


def _checkin_for_round(
    client: FederatedClient, job: DeviceJob, rng: random.Random, result: JobResult
) -> Assignment | None:
    """Check in until assigned to the expected round; None (with result.status set) otherwise."""
    deadline = time.monotonic() + job.assignment_timeout_s
    while True:
        answer = client.checkin(job.task_id, {"accelerator": "cpu", "num_samples": result.num_samples})
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
