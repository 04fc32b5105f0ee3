"""End to end: a task with policy.dp on a real uvicorn server (SQLite file), three SDK devices uploading
tiny deltas; (epsilon, delta) grows round by round in the round and task views, and the epsilon budget
stops the task after as many rounds as the accountant allows."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import pytest

from device_sdk import AdminClient, FederatedClient
from facefl.privacy.accountant import epsilon_spent, rounds_within_budget
from tests.conftest import ADMIN, SECRET, LiveServer
from tests.server_api.fleet import Fleet


def test_epsilon_is_reported_per_round_and_the_budget_stops_the_task(tmp_path: Path) -> None:
    target, population, z, delta = 2, 8, 1.0, 1e-5
    q = target / population
    # a budget between the epsilons of 2 and 3 rounds: never at a float boundary
    budget = (epsilon_spent(q, z, 2, delta) + epsilon_spent(q, z, 3, delta)) / 2
    expected_rounds = rounds_within_budget(q, z, delta, budget, limit=10)
    server = LiveServer(tmp_path, FACEFL_MAX_RETRY_AFTER_S="0.3").start()
    try:
        with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
            task = admin.create_task(
                "dp",
                architecture="tiny",
                embedding_dim=8,
                rounds=10,
                policy={
                    "target_reports": target,
                    "min_reports": target,
                    "round_timeout_s": 60,
                    "dp": {
                        "clip_norm": 0.5,
                        "noise_multiplier": z,
                        "delta": delta,
                        "population": population,
                        "epsilon_budget": budget,
                    },
                },
            )
            assert task.raw["privacy"] == {
                "epsilon": 0.0,
                "delta": delta,
                "rounds": 0,
                "epsilon_budget": budget,
                "noise_added_by": "server",
            }
            Fleet(server.base_url, n=3, task_id=task.id).start().join(timeout=120)

            done = admin.get_task(task.id)
            assert (done.status, done.aggregated_rounds) == ("budget_exhausted", expected_rounds)
            assert done.current_round is None
            privacy = done.raw["privacy"]
            assert privacy["epsilon"] == pytest.approx(epsilon_spent(q, z, expected_rounds, delta))
            assert privacy["epsilon"] <= budget and privacy["rounds"] == expected_rounds

            aggregated = [r for r in admin.task_rounds(task.id) if r.status == "aggregated"]
            epsilons = [admin.get_round(r.id).metrics["dp_epsilon"] for r in aggregated]
            assert epsilons == pytest.approx(
                [epsilon_spent(q, z, k, delta) for k in range(1, expected_rounds + 1)]
            )
            assert all(a < b for a, b in itertools.pairwise(epsilons))
            assert all(admin.get_round(r.id).metrics["dp_delta"] == delta for r in aggregated)

        # a device checking in now is told why there is nothing to train
        with FederatedClient(server.base_url) as c:
            creds = c.register(SECRET, name="late")
        r = httpx.post(
            f"{server.base_url}/v1/checkin",
            json={"task_id": task.id},
            headers={"Authorization": f"Bearer {creds.token}"},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["reason"] == "privacy_budget_exhausted"

        # the operator's console shows the status and the epsilon spent
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            assert c.post("/console/login", data={"token": ADMIN, "next": "/console"}).status_code == 303
            page = c.get(f"/console/tasks/{task.id}").text
        assert "budget_exhausted" in page
        assert f"ε = {privacy['epsilon']:.3g}, δ = {delta}" in page
    finally:
        server.stop()
