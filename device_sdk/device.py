"""One federated round on a device, end to end: check in, download, train, upload."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from facefl.algorithms import registry

from .client import FederatedClient
from .dataset import LocalDataset
from .records import Assignment, UploadReceipt
from .trainer import RoundInputs, Trainer, TrainResult

__all__ = ["RoundHooks", "RoundReport", "fetch_round_inputs", "run_round"]

_T = TypeVar("_T")


class RoundHooks:
    """Points where an app steps into :func:`run_round`; the defaults do nothing.

    Subclass to observe a round (phase timings, training metrics) or to steer it: ``call`` wraps each
    network step, so it can add a retry policy (e.g. ride out a server restart), and an exception raised
    from any hook ends the round there and propagates out of ``run_round`` (e.g. a device that goes
    away after training uploads nothing). The simulator's devices are built on these hooks.
    """

    def call(self, step: str, fn: Callable[[], _T]) -> _T:
        """Run one network step: ``"download"`` (the base model), ``"inputs"`` (the algorithm's round
        inputs) or ``"upload"``; under secure aggregation ``"secagg_keys"``, ``"secagg_shares"``,
        ``"secagg_upload"`` and ``"secagg_reveal"`` instead of ``"upload"``."""
        return fn()

    def on_phase(self, phase: str, seconds: float) -> None:
        """A phase ended: ``"wait"`` (for the assignment), ``"download"``, ``"train"`` or ``"upload"``."""

    def on_trained(self, assignment: Assignment, result: TrainResult) -> None:
        """Training ended and its delta is about to be uploaded."""


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
    assignment: Assignment | None = None,
    hooks: RoundHooks | None = None,
) -> RoundReport:
    """Wait for an assignment, download its base model, train on ``dataset``, upload the delta.

    With ``assignment`` (one the app got from its own :meth:`~FederatedClient.checkin`) the round starts
    from it instead of waiting for one. ``hooks`` observe and steer the steps (:class:`RoundHooks`).

    Raises the SDK's typed errors (e.g. :class:`~device_sdk.errors.AssignmentTimeout`,
    :class:`~device_sdk.errors.RoundClosed` when the device was too slow for the round's deadline).
    """
    hooks = hooks if hooks is not None else RoundHooks()
    t0 = time.perf_counter()
    # (a name of its own: the lambdas below must not see the Optional parameter)
    current = assignment or client.wait_for_assignment(task_id, timeout_s=assignment_timeout_s)
    t1 = time.perf_counter()
    hooks.on_phase("wait", t1 - t0)
    base = hooks.call("download", lambda: client.download_model(current.base_version))
    inputs = hooks.call("inputs", lambda: fetch_round_inputs(client, current))
    t2 = time.perf_counter()
    hooks.on_phase("download", t2 - t1)
    result = trainer.train(current, base, dataset, state_dir, seed=seed, inputs=inputs)
    t3 = time.perf_counter()
    hooks.on_phase("train", t3 - t2)
    hooks.on_trained(current, result)
    upload_started = time.perf_counter()
    if current.secure_aggregation is not None:
        # the stages of secure aggregation, each request through hooks.call; no metrics leave the device
        receipt = client.upload_secure(current, result.delta, result.num_samples, step=hooks.call)
    else:
        receipt = hooks.call(
            "upload", lambda: client.upload_update(current, result.delta, result.num_samples, result.metrics)
        )
    t4 = time.perf_counter()
    hooks.on_phase("upload", t4 - upload_started)
    return RoundReport(
        assignment=current,
        receipt=receipt,
        num_samples=result.num_samples,
        metrics=result.metrics,
        wait_seconds=t1 - t0,
        download_seconds=t2 - t1,
        train_seconds=t3 - t2,
        upload_seconds=t4 - upload_started,
    )
