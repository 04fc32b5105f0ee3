"""Fixtures of the device SDK tests: a real server (uvicorn on 127.0.0.1, temporary SQLite, dev mode)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from device_sdk import AdminClient, TaskInfo
from tests.conftest import ADMIN, SECRET, LiveServer


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Train with one intra-op thread: on a small, shared CPU, more threads spin and run several times
    slower for these tiny batches. Restored afterwards so other tests see the process default."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(base_url, admin_token, enrollment_secret) of one real server shared by the session's SDK tests.

    Tests isolate themselves by creating their own task and devices.
    """
    server = LiveServer(tmp_path_factory.mktemp("sdk-server"), FACEFL_DEV_MODE="1").start()
    try:
        yield server.base_url, ADMIN, SECRET
    finally:
        server.stop()


def create_task(
    base_url: str, admin_token: str, *, rounds: int = 3, policy: dict[str, Any] | None = None
) -> TaskInfo:
    """A FedAvg task of the small model, created through the SDK's AdminClient; ``policy`` entries
    replace the defaults."""
    default_policy = {"target_reports": 1, "min_reports": 1, "over_selection": 1.0, "round_timeout_s": 600}
    with AdminClient(base_url, admin_token, timeout=30) as admin:
        return admin.create_task(
            "sdk-test",
            algorithm="fedavg",
            architecture="small",
            seed=0,
            rounds=rounds,
            hyperparams={"local_epochs": 1, "batch_size": 8, "lr": 0.05},
            policy={**default_policy, **(policy or {})},
        )
