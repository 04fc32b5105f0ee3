"""Four uvicorn workers (`facefl serve --workers 4`) on PostgreSQL and on SQLite: 40 devices, 3 rounds.

Exactly 5 new model versions, every acknowledged update counted exactly once, even though one worker is
SIGKILLed while devices are uploading (uvicorn's supervisor starts a replacement)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from device_sdk import AdminClient
from tests.conftest import ADMIN
from tests.server_api.fleet import Fleet, check_every_ack_counted_once
from tests.server_api.serve import ServeProcess

pytestmark = [pytest.mark.slow]
ROUNDS = 3


def _metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in Prometheus text."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_four_workers_forty_devices_three_rounds(
    tmp_path: Path, db: str, request: pytest.FixtureRequest
) -> None:
    # SQLite: the workers share one write lock across processes (slower, but the same guarantees)
    url = request.getfixturevalue("pg_url") if db == "postgres" else f"sqlite:///{tmp_path / 'facefl.db'}"
    server = ServeProcess(tmp_path, url, workers=4, FACEFL_AGGREGATION_LEASE_S="5").start()
    try:
        with (
            httpx.Client(base_url=server.base_url, timeout=30) as c,
            AdminClient(server.base_url, ADMIN, timeout=30) as admin,
        ):
            admin.create_task(
                "scale",
                architecture="small",
                embedding_dim=8,
                rounds=ROUNDS,
                policy={
                    "target_reports": 8,
                    "min_reports": 8,
                    "over_selection": 1.25,
                    "round_timeout_s": 120,
                },
            )
            fleet = Fleet(server.base_url, n=40).start()
            # SIGKILL one worker while uploads are in flight (first round under way)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                acked, in_flight = fleet.snapshot()
                if acked >= 3 and in_flight >= 1:
                    break
                time.sleep(0.005)
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            fleet.join(timeout=120)
            task = admin.get_task(1)
            assert task.status == "completed" and task.aggregated_rounds == ROUNDS
            metrics = c.get("/metrics").text
        rounds = check_every_ack_counted_once(url, fleet.acks, ROUNDS)
        deadline = time.monotonic() + 30  # the supervisor notices the death between health pings
        while len(server.worker_pids()) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert victim not in server.worker_pids() and len(server.worker_pids()) == 4
        # multiprocess metrics: the surviving and the replacement workers' counts add up; the killed
        # worker's files stay in the directory, so nothing it counted is lost either
        assert _metric(metrics, "facefl_rounds_closed_total") >= ROUNDS
        assert _metric(metrics, "facefl_reports_accepted_total") >= len(fleet.acks)
        assert sum(r["n_updates"] for r in rounds if r["status"] == "aggregated") >= len(fleet.acks)
    finally:
        server.stop()
