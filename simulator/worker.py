"""One simulated device's round, run in a worker process: check in, then the SDK's ``run_round``.

Everything a job needs is in its :class:`DeviceJob` (picklable) or on disk under the device's directory
(credentials and the local-head state), so any worker process can run any device in any round. The jobs
of one worker process share one connection pool (:func:`shared_transport`); a :class:`DeviceBatch` runs
several jobs at once in threads of one process (:func:`run_device_batch`), so that their HTTP waits
overlap, while their trainings run one at a time (each seeded training draws from torch's process-wide
generator alone). Across processes, a pool may hold more processes than training slots (the simulator's
``overlap``): a training then first takes a slot (a semaphore shared by the pool), so that at most one
training per slot runs while the other processes check in, download or upload.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import torch

from device_sdk import (
    Assignment,
    DeviceCredentials,
    DuplicateUpload,
    FaceflError,
    FederatedClient,
    LocalDataset,
    RoundClosed,
    RoundHooks,
    SecureAggregationError,
    ServerError,
    SharedTransport,
    Trainer,
    TrainResult,
    TransportError,
    run_round,
)
from facefl.fileio import atomic_write

from .faults import DeviceFault, corrupt_payload

__all__ = [
    "DataSpec",
    "DeviceBatch",
    "DeviceJob",
    "JobResult",
    "init_worker",
    "load_device_data",
    "run_device_batch",
    "run_device_job",
    "shared_transport",
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
    # secure aggregation: the protocol's requests the server accepted, in order ("secagg_keys",
    # "secagg_shares", "secagg_upload", "secagg_reveal"); empty in a plain round
    secagg_steps: list[str] = field(default_factory=list)
    # when its training ran (wall-clock seconds, time.time(): comparable across the pool's processes)
    train_window: tuple[float, float] | None = None


@dataclass(frozen=True)
class DeviceBatch:
    """Device jobs that one worker process runs with up to ``threads`` of them at a time."""

    jobs: tuple[DeviceJob, ...]
    threads: int = 1


_DATA_CACHE: dict[DataSpec, LocalDataset] = {}
_TRANSPORT: SharedTransport | None = None  # this worker process's connection pool (shared_transport)
_TRANSPORT_LOCK = threading.Lock()
# one training at a time per process: torch's random generator is process-wide, so seeded trainings in
# concurrent threads would draw from it in turns that change from run to run
_TRAIN_LOCK = threading.Lock()
# the pool's training slots (a multiprocessing semaphore, set by init_worker): None = no limit but the lock
_TRAIN_SLOTS: Any | None = None


def init_worker(ready: Any | None = None, train_slots: Any | None = None) -> None:
    """Process initializer: one intra-op thread per worker (the pool provides the parallelism).

    With ``ready`` (a multiprocessing semaphore), run one small forward and backward pass first, so that
    torch's lazy kernel set-up happens now rather than inside a device's first round, then release it:
    the simulator opens the first round only when every worker is ready (a round's deadline should
    measure devices, not interpreter start-up). ``train_slots`` (a multiprocessing semaphore shared by
    the pool): a training waits for one of its slots, so that a pool with more processes than cores
    trains no more devices at once than it has slots."""
    global _TRAIN_SLOTS
    _TRAIN_SLOTS = train_slots
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only allowed once per process
        torch.set_num_interop_threads(1)
    if ready is not None:
        layer = torch.nn.Conv2d(3, 4, 3)
        layer(torch.zeros(2, 3, 8, 8)).sum().backward()
        ready.release()


def warm_up() -> None:
    """A no-op job: submitting one per worker starts the processes (and their imports) early."""


def load_device_data(spec: DataSpec, store: Path | None = None) -> LocalDataset:
    """The device's local dataset, deterministic in ``spec`` (cached per worker process).

    With ``store`` (a directory of the device's), the dataset is also kept there, so that another worker
    process that runs this device later reads it instead of generating or decoding it again: the pool's
    processes take a round's jobs in any order, so each would otherwise build every device's data once.
    """
    cached = _DATA_CACHE.get(spec)
    if cached is not None:
        return cached
    path = None if store is None else store / f"dataset-{_spec_key(spec)}.npz"
    dataset = _read_dataset(path) if path is not None else None
    if dataset is None:
        dataset = _build_device_data(spec)
        if path is not None:
            _write_dataset(path, dataset)
    if len(_DATA_CACHE) > 256:
        _DATA_CACHE.clear()
    _DATA_CACHE[spec] = dataset
    return dataset


def _spec_key(spec: DataSpec) -> str:
    # the frozen dataclass's repr holds every field (tuples, numbers, strings): stable across processes
    return hashlib.sha256(repr(spec).encode("utf-8")).hexdigest()[:20]


def _read_dataset(path: Path) -> LocalDataset | None:
    """A dataset written by :func:`_write_dataset`; None when absent or unreadable (then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return LocalDataset(
                images=data["images"], labels=data["labels"], identities=tuple(data["identities"].tolist())
            )
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _write_dataset(path: Path, dataset: LocalDataset) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f, images=dataset.images, labels=dataset.labels, identities=np.array(dataset.identities, str)
            )

    atomic_write(path, write)  # whole or absent: processes may write the same device's data at once


def _build_device_data(spec: DataSpec) -> LocalDataset:
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
    return dataset


def run_device_batch(batch: DeviceBatch) -> list[JobResult]:
    """Run the batch's jobs, ``batch.threads`` at a time; the results in the jobs' order."""
    if batch.threads <= 1 or len(batch.jobs) <= 1:
        return [run_device_job(job) for job in batch.jobs]
    with ThreadPoolExecutor(max_workers=min(batch.threads, len(batch.jobs))) as pool:
        return list(pool.map(run_device_job, batch.jobs))


class _SerialTrainer(Trainer):
    """A Trainer whose trainings in this process run one at a time (see ``_TRAIN_LOCK``), each in one of
    the pool's training slots when it has them (``_TRAIN_SLOTS``); ``waited_s``: the time spent waiting."""

    waited_s = 0.0
    window: tuple[float, float] | None = None

    def train(self, *args: Any, **kwargs: Any) -> TrainResult:
        started = time.perf_counter()
        with _TRAIN_LOCK, _train_slot():
            self.waited_s = time.perf_counter() - started
            began = time.time()
            try:
                return super().train(*args, **kwargs)
            finally:
                self.window = (began, time.time())


@contextlib.contextmanager
def _train_slot() -> Iterator[None]:
    slots = _TRAIN_SLOTS
    if slots is None:
        yield
        return
    slots.acquire()
    try:
        yield
    finally:
        slots.release()


def run_device_job(job: DeviceJob) -> JobResult:
    """Run one device for one round; never raises for protocol outcomes (they are the result's status).

    The round itself is the SDK's :func:`device_sdk.run_round`, from the assignment this job's check-in
    got; the simulated faults and the outage retries step in through its :class:`~device_sdk.RoundHooks`.
    """
    started = time.perf_counter()
    result = JobResult(device_index=job.device_index, status=FAILED)
    device_dir = Path(job.device_dir)
    rng = random.Random(job.seed)
    try:
        creds = DeviceCredentials.load(device_dir / "credentials.json")
        dataset = load_device_data(job.data, device_dir / "data")
        result.num_samples = len(dataset)
        client = FederatedClient(
            job.base_url,
            token=creds.token,
            device_id=creds.device_id,
            timeout=job.http_timeout_s,
            transport=shared_transport(),
            rng=rng,
            backoff_base_s=0.1,
            backoff_cap_s=2.0,
            # shared by the simulated devices of a run: FedFR's public pack is downloaded once
            cache_dir=device_dir.parent.parent / "cache",
        )
        with client:
            try:
                fault = job.fault or DeviceFault()
                result.fault = fault.kind
                checkin_started = time.perf_counter()
                assignment = _checkin_for_round(client, job, rng, result)
                result.phases["checkin"] = time.perf_counter() - checkin_started
                if assignment is not None and fault.drop_after == "checkin":
                    result.status = DROPPED
                elif assignment is not None:
                    trainer = _SerialTrainer()
                    hooks = _DeviceHooks(job, rng, result, fault, client, trainer)
                    state, seed = device_dir / "state", job.seed
                    run_round(client, trainer, dataset, state, seed=seed, assignment=assignment, hooks=hooks)
                    result.status = UPLOADED
            except _RoundEnded as ended:
                result.status = ended.status
            except (RoundClosed, SecureAggregationError) as exc:  # the round went on without it
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


def shared_transport() -> SharedTransport:
    """This process's connection pool, shared by the clients of all the device jobs it runs: a client
    per job is then cheap (building a transport costs an SSL context, about 20 ms of CPU)."""
    global _TRANSPORT
    with _TRANSPORT_LOCK:
        if _TRANSPORT is None:
            _TRANSPORT = SharedTransport()
        return _TRANSPORT


class _RoundEnded(Exception):
    """A simulated device ends its round early (a fault, or an upload found already stored)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class _DeviceHooks(RoundHooks):
    """A simulated device's faults and outage retries, stepping into the SDK's round."""

    def __init__(
        self,
        job: DeviceJob,
        rng: random.Random,
        result: JobResult,
        fault: DeviceFault,
        client: FederatedClient,
        trainer: _SerialTrainer,
    ) -> None:
        self.job, self.rng, self.result, self.fault, self.client = job, rng, result, fault, client
        self.trainer = trainer
        self.vanish_before_masked_upload = False

    def call(self, step: str, fn: Callable[[], _T]) -> _T:
        if step.startswith("secagg_"):
            if step == "secagg_upload" and self.vanish_before_masked_upload:
                raise _RoundEnded(DROPPED)
            answer = _outage_retry(self.job, self.rng, fn)
            self.result.secagg_steps.append(step)
            return answer
        if step != "upload":
            return _outage_retry(self.job, self.rng, fn)
        # after a transport failure (the server may have died mid-request) the upload is sent again: a
        # 409 then means that the first attempt was committed, which is success
        attempts = 0
        started = time.perf_counter()

        def once() -> _T:
            nonlocal attempts
            attempts += 1
            try:
                return fn()
            except DuplicateUpload:
                if attempts == 1:
                    raise
                self.result.phases["upload"] = time.perf_counter() - started
                raise _RoundEnded(UPLOADED) from None

        return _outage_retry(self.job, self.rng, once)

    def on_phase(self, phase: str, seconds: float) -> None:
        if phase == "wait":  # the job checked in itself (phase "checkin")
            return
        if phase == "train":  # the wait for a training slot is no part of the device's training
            waited = self.trainer.waited_s
            self.result.phases["train_wait"] = waited
            self.result.train_window = self.trainer.window
            seconds -= waited
        self.result.phases[phase] = seconds
        if phase == "download" and self.fault.drop_after == "download":
            raise _RoundEnded(DROPPED)

    def on_trained(self, assignment: Assignment, trained: TrainResult) -> None:
        result, fault = self.result, self.fault
        result.train_seconds = trained.seconds
        result.metrics = trained.metrics
        if fault.slow_factor > 1.0:  # a straggler: training took slow_factor times longer
            straggle_started = time.perf_counter()
            time.sleep((fault.slow_factor - 1.0) * trained.seconds)
            result.phases["straggle"] = time.perf_counter() - straggle_started
        if fault.drop_after == "train" and assignment.secure_aggregation is not None:
            # under secure aggregation the device vanishes later, after its keys and shares: the case the
            # protocol's unmasking recovers from (its neighbours reveal its mask key)
            self.vanish_before_masked_upload = True
        elif self.job.drop_after_training or fault.drop_after == "train":
            raise _RoundEnded(DROPPED)
        if fault.corrupt is not None:
            upload_started = time.perf_counter()
            body = corrupt_payload(fault.corrupt, trained.delta, self.job.seed)
            result.upload_status = _upload_raw(self.client, assignment, body, self.job)
            result.phases["upload"] = time.perf_counter() - upload_started
            refused = 400 <= result.upload_status < 500
            raise _RoundEnded(CORRUPT_REFUSED if refused else CORRUPT_ACCEPTED)


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


def _upload_raw(client: FederatedClient, assignment: Assignment, body: bytes, job: DeviceJob) -> int:
    """POST ``body`` as the update (a simulated corrupt upload); returns the HTTP status."""
    headers = {
        "Authorization": f"Bearer {client.token}",
        "X-Upload-Token": assignment.upload_token,
        "Content-Type": "application/octet-stream",
    }
    with httpx.Client(
        base_url=job.base_url.rstrip("/"), transport=shared_transport(), timeout=job.http_timeout_s
    ) as raw:
        path = f"/v1/rounds/{assignment.round_id}/updates"
        resp = raw.post(path, params={"num_samples": 1}, content=body, headers=headers)
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
