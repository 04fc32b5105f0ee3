"""run_round from an assignment the app already holds, observed and steered through RoundHooks, against a
real server (the simulator's devices are built on these hooks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from device_sdk import (
    AdminClient,
    Assignment,
    FederatedClient,
    LocalDataset,
    RoundHooks,
    Trainer,
    TrainResult,
    run_round,
)
from tests.device_sdk.conftest import create_task

_T = TypeVar("_T")


class Recording(RoundHooks):
    def __init__(self, stop_after_training: bool = False) -> None:
        self.steps: list[str] = []
        self.phases: dict[str, float] = {}
        self.trained: TrainResult | None = None
        self.stop_after_training = stop_after_training

    def call(self, step: str, fn: Callable[[], _T]) -> _T:
        self.steps.append(step)
        return fn()

    def on_phase(self, phase: str, seconds: float) -> None:
        self.phases[phase] = seconds

    def on_trained(self, assignment: Assignment, result: TrainResult) -> None:
        self.trained = result
        if self.stop_after_training:
            raise KeyboardInterrupt("the app went away")  # not an SDK error: it must pass through


def test_hooks_see_every_step_and_the_round_uses_the_given_assignment(
    live_server: tuple[str, str, str], tmp_path: Path
) -> None:
    base_url, admin_token, secret = live_server
    task = create_task(base_url, admin_token)
    dataset = LocalDataset.synthetic([1, 2], images_per_identity=3, image_size=64, seed=0)
    hooks = Recording()
    with FederatedClient(base_url) as client:
        client.register(secret)
        assignment = client.wait_for_assignment(task.id, timeout_s=30)
        trainer = Trainer(device="cpu", num_threads=1)
        report = run_round(client, trainer, dataset, tmp_path, seed=0, assignment=assignment, hooks=hooks)
    assert report.assignment == assignment and report.receipt.round_id == assignment.round_id
    assert hooks.steps == ["download", "inputs", "upload"]
    assert list(hooks.phases) == ["wait", "download", "train", "upload"]
    assert hooks.trained is not None and hooks.trained.metrics == report.metrics
    assert report.train_seconds == hooks.phases["train"]


def test_an_exception_from_a_hook_ends_the_round_before_the_upload(
    live_server: tuple[str, str, str], tmp_path: Path
) -> None:
    base_url, admin_token, secret = live_server
    task = create_task(base_url, admin_token)
    dataset = LocalDataset.synthetic([3, 4], images_per_identity=3, image_size=64, seed=0)
    hooks = Recording(stop_after_training=True)
    with FederatedClient(base_url) as client, AdminClient(base_url, admin_token) as admin:
        client.register(secret)
        trainer = Trainer(device="cpu", num_threads=1)
        with pytest.raises(KeyboardInterrupt):
            run_round(client, trainer, dataset, tmp_path, task.id, seed=0, hooks=hooks)
        assert "upload" not in hooks.steps and hooks.trained is not None
        assert task.current_round is not None
        assert admin.get_round(task.current_round.id).reported == 0  # nothing was sent
