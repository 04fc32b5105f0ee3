"""run_round under secure aggregation: three devices train the `tiny` model on synthetic faces and run
the protocol's stages through RoundHooks, against the SDK tests' real server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from device_sdk import (
    AdminClient,
    FederatedClient,
    LocalDataset,
    RoundHooks,
    RoundReport,
    SecureAggregationError,
    Trainer,
    run_round,
)

_T = TypeVar("_T")


class Steps(RoundHooks):
    def __init__(self) -> None:
        self.steps: list[str] = []

    def call(self, step: str, fn: Callable[[], _T]) -> _T:
        self.steps.append(step)
        return fn()


def test_run_round_runs_the_secure_stages(live_server: tuple[str, str, str], tmp_path: Path) -> None:
    base_url, admin_token, secret = live_server
    n = 3
    policy = {
        "target_reports": n, "min_reports": 2, "over_selection": 1.0, "round_timeout_s": 120,
        "secure_aggregation": {"clip_norm": 5.0, "stage_timeout_s": 30},
    }  # fmt: skip
    with AdminClient(base_url, admin_token, timeout=30) as admin:
        task = admin.create_task(
            "secure", architecture="tiny", rounds=1, seed=0, policy=policy,
            hyperparams={"local_epochs": 1, "batch_size": 4, "lr": 0.05},
        )  # fmt: skip
    hooks = [Steps() for _ in range(n)]
    reports: dict[int, RoundReport] = {}
    errors: list[BaseException] = []

    def device(i: int) -> None:
        try:
            # generated at 16 px (the generator's floor is 8); the trainer resizes to tiny's 4x4 input
            dataset = LocalDataset.synthetic(
                [10 * i, 10 * i + 1], images_per_identity=3, image_size=16, seed=i
            )
            with FederatedClient(base_url, timeout=30) as client:
                client.register(secret)
                trainer = Trainer(device="cpu", num_threads=1)
                reports[i] = run_round(
                    client, trainer, dataset, tmp_path / f"d{i}", task.id, seed=i, hooks=hooks[i]
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for h in hooks:
        assert h.steps == [
            "download",
            "inputs",
            "secagg_keys",
            "secagg_shares",
            "secagg_upload",
            "secagg_reveal",
        ]
    with AdminClient(base_url, admin_token, timeout=30) as admin:
        assert task.current_round is not None
        done = admin.wait_for_round(task.current_round.id, timeout_s=60)
        assert done.status == "aggregated" and done.result_version is not None
        base, new = admin.download_model(done.base_version), admin.download_model(done.result_version)
    assert sorted(reports) == list(range(n))
    assert any(not np.array_equal(base[k], new[k]) for k in base)  # the trained updates moved the model


def test_a_device_too_late_for_the_cohort_gets_a_secure_aggregation_error(
    live_server: tuple[str, str, str],
) -> None:
    base_url, admin_token, secret = live_server
    policy = {
        "target_reports": 2, "min_reports": 2, "over_selection": 1.5, "round_timeout_s": 120,
        "secure_aggregation": {"clip_norm": 5.0, "stage_timeout_s": 30},
    }  # fmt: skip
    with AdminClient(base_url, admin_token, timeout=30) as admin:
        task = admin.create_task("late", architecture="tiny", rounds=1, seed=0, policy=policy)
        base = admin.download_model(task.current_version or 0)
    clients = [FederatedClient(base_url, timeout=30) for _ in range(3)]
    for c in clients:
        c.register(secret)
    assignments = [c.wait_for_assignment(task.id, timeout_s=30) for c in clients]  # 3 slots for a cohort of 2
    delta = {k: np.full_like(v, 0.001) for k, v in base.items()}
    errors: list[BaseException] = []
    advertised = threading.Semaphore(0)
    late_tried = threading.Event()

    def step(name: str, fn: Callable[[], _T]) -> _T:
        if name == "secagg_shares":  # the cohort is fixed: hold the round here until the late device tried
            late_tried.wait(30)
        result = fn()
        if name == "secagg_keys":
            advertised.release()
        return result

    def on_time(i: int) -> None:
        try:
            clients[i].upload_secure(assignments[i], delta, 5, step=step)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=on_time, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    assert advertised.acquire(timeout=30) and advertised.acquire(timeout=30)
    try:
        with pytest.raises(SecureAggregationError, match="without this device"):  # the keys stage is over
            clients[2].upload_secure(assignments[2], delta, 5)
    finally:
        late_tried.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for c in clients:
        c.close()
