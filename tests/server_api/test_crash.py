"""SIGKILL of the whole server *during* concurrent uploads, twice, then restart on the same address.

Every update acknowledged with 202 before a kill is in the database right after it (before any restart),
the open round resumes after the restart, and every acknowledged update is counted exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from device_sdk import AdminClient
from tests.conftest import ADMIN
from tests.server_api.fleet import Fleet, check_every_ack_counted_once, rounds_of, stored_updates
from tests.server_api.serve import ServeProcess

pytestmark = pytest.mark.slow
ROUNDS = 2


def _kill_during_uploads(server: ServeProcess, fleet: Fleet, min_acks: int, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        acked, in_flight = fleet.snapshot()
        if acked >= min_acks and in_flight >= 2:  # at least two uploads under way right now
            break
        time.sleep(0.002)
    else:
        raise AssertionError(f"never saw concurrent uploads (acks {fleet.snapshot()})")
    server.kill()
    acked_before_kill = list(fleet.acks)  # nothing can be acknowledged after the kill
    stored = stored_updates(url)  # the server is dead: this is what it left on disk
    for ack in acked_before_kill:
        assert stored.get(ack.update_id) == (ack.round_id, ack.device_id), ack
    for r in rounds_of(url):
        assert r["reported"] == r["n_updates"], r  # the counter and the rows never disagree


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_during_concurrent_uploads(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'crash.db'}"
    server = ServeProcess(tmp_path, url, workers=1).start()
    fleet: Fleet | None = None
    try:
        with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
            admin.create_task(
                "crash",
                architecture="small",
                embedding_dim=8,
                rounds=ROUNDS,
                policy={
                    "target_reports": 10,
                    "min_reports": 10,
                    "over_selection": 1.5,
                    "round_timeout_s": 120,
                },
            )
        fleet = Fleet(server.base_url, n=16).start()
        _kill_during_uploads(server, fleet, 2, url)
        server.start(same_port=True)
        _kill_during_uploads(server, fleet, len(fleet.acks) + 3, url)
        server.start(same_port=True)
        fleet.join(timeout=120)
        with AdminClient(server.base_url, ADMIN, timeout=30) as admin:
            task = admin.get_task(1)
        assert task.status == "completed" and task.aggregated_rounds == ROUNDS
        check_every_ack_counted_once(url, fleet.acks, ROUNDS)
    finally:
        server.kill()
