"""One federated round on a device, end to end: check in, download, train, upload."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from facefl.algorithms import registry

from .client import Assignment, FederatedClient, UploadReceipt
from .dataset import LocalDataset
from .trainer import RoundInputs, Trainer

__all__ = ["RoundReport", "fetch_round_inputs", "run_round"]


@dataclass(frozen=True)
class RoundReport:
    """What happened in one round on this device (kept locally; the server got only the upload)."""

    assignment: Assignment
    receipt: UploadReceipt
    num_samples: int
    metrics: dict[str, float]
    wait_seconds: float
    download_seconds: float
    train_seconds: float
    upload_seconds: float


def fetch_round_inputs(client: FederatedClient, assignment: Assignment) -> RoundInputs | None:
    """Download what the assignment's algorithm needs besides the base model (its ``round_inputs``).

    FedFR: the task's public pack (cached by the client's ``cache_dir``: fetched once) and the base
    version's public feature bank, whole. FedFace: this device's own class embedding (None in its first
    round). Other algorithms: nothing.
    """
    return registry.get(assignment.algorithm).round_inputs(client, assignment)


def run_round(
    client: FederatedClient,
    trainer: Trainer,
    dataset: LocalDataset,
    state_dir: str | Path | None,
    task_id: int | None = None,
    *,
    assignment_timeout_s: float = 600.0,
    seed: int | None = None,
) -> RoundReport:
    """Wait for an assignment, download its base model, train on ``dataset``, upload the delta.

    Raises the SDK's typed errors (e.g. :class:`~device_sdk.errors.AssignmentTimeout`,
    :class:`~device_sdk.errors.RoundClosed` when the device was too slow for the round's deadline).
    """
    t0 = time.perf_counter()
    assignment = client.wait_for_assignment(task_id, timeout_s=assignment_timeout_s)
    t1 = time.perf_counter()
    base = client.download_model(assignment.base_version)
    inputs = fetch_round_inputs(client, assignment)
    t2 = time.perf_counter()
    result = trainer.train(assignment, base, dataset, state_dir, seed=seed, inputs=inputs)
    t3 = time.perf_counter()
    receipt = client.upload_update(assignment, result.delta, result.num_samples, result.metrics)
    t4 = time.perf_counter()
    return RoundReport(
        assignment=assignment,
        receipt=receipt,
        num_samples=result.num_samples,
        metrics=result.metrics,
        wait_seconds=t1 - t0,
        download_seconds=t2 - t1,
        train_seconds=t3 - t2,
        upload_seconds=t4 - t3,
    )
