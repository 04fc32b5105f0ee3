"""Fixtures of the device SDK tests: a real server (uvicorn on 127.0.0.1, temporary SQLite, dev mode)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

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


def create_task(base_url: str, admin_token: str, **overrides: Any) -> dict[str, Any]:
    """POST /v1/tasks with the admin token; returns the TaskOut JSON."""
    body: dict[str, Any] = {
        "name": "sdk-test",
        "algorithm": "fedavg",
        "architecture": "small",
        "seed": 0,
        "rounds": 3,
        "hyperparams": {"local_epochs": 1, "batch_size": 8, "lr": 0.05},
        "policy": {"target_reports": 1, "min_reports": 1, "over_selection": 1.0, "round_timeout_s": 600},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    resp = httpx.post(
        f"{base_url}/v1/tasks", json=body, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
    )
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()
    return data
