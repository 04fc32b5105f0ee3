"""PostgreSQL's one-statement check-in (server_api/services/queries/checkin_statement.py) against the
check-in transaction (rounds.checkin_transaction), on real PostgreSQL.

- For every kind of state a check-in can meet (task status, active round or none, its status, deadline
  passed or not, slots left or not, the device's assignment: none, unreported, reported; the task named,
  the default task, an unknown task; capabilities sent or not), both start from the same rows with the
  same clock and token: the outcome (rounds.decide's, or round_full), the view and every row they leave
  behind must be the same. This is what keeps the statement's write conditions and rounds.decide, the
  one definition of the outcomes, from drifting apart.
- The concurrency argument of the statement (the touch only updates the device row its snapshot saw):
  a check-in of the same device that commits while the statement waits for the device's row, having
  taken the round's last slot, must be seen: the statement's check-in renews that assignment's token
  (as the transaction would, after waiting for the lock), it does not answer round_full.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, insert, select, text, update

from server_api import security
from server_api.app import create_app
from server_api.orm import (
    ROUND_AGGREGATED,
    ROUND_AGGREGATING,
    ROUND_OPEN,
    TASK_BUDGET_EXHAUSTED,
    TASK_PAUSED,
    TASK_RUNNING,
    Assignment,
    Device,
    Round,
    Task,
    utcnow,
)
from server_api.schemas import CheckinIn, TrainAction
from server_api.services import queries, rounds
from server_api.services.context import ServiceContext
from tests.conftest import ADMIN, SECRET, make_settings

pytestmark = pytest.mark.postgres

CAPS = {"accelerator": "cpu", "num_samples": 7}


@pytest.fixture
def world(pg_url: str, tmp_path: Path) -> Iterator[tuple[ServiceContext, int, str]]:
    """A task (with its first round) and a device, made through the API; then a context of its own, with
    no ticker that could close or open rounds under the test."""
    settings = make_settings(tmp_path, pg_url)
    with TestClient(create_app(settings)) as client:
        task = {"name": "t", "architecture": "tiny", "rounds": 2, "policy": {"round_timeout_s": 600}}
        r = client.post("/v1/tasks", json=task, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        task_id = int(r.json()["id"])
        r = client.post("/v1/devices", json={"enrollment_secret": SECRET})
        assert r.status_code == 201, r.text
        device_id = r.json()["device_id"]
    ctx = ServiceContext.from_settings(settings)
    try:
        yield ctx, task_id, device_id
    finally:
        ctx.close()


def _set_state(
    ctx: ServiceContext, task_id: int, device_id: str, now: datetime, state: dict[str, Any]
) -> int:
    """Rows as ``state`` says; returns the round's id."""
    with ctx.db.write() as s:
        s.execute(delete(Assignment))
        s.execute(update(Device).values(last_seen_at=None, capabilities={}))
        s.execute(update(Task).where(Task.id == task_id).values(status=state["task"]))
        round_id = s.scalars(select(Round.id).where(Round.task_id == task_id)).one()
        deadline = now + (timedelta(minutes=5) if state["future"] else -timedelta(seconds=1))
        assigned = 2 if state["full"] else 1
        s.execute(
            update(Round)
            .where(Round.id == round_id)
            .values(status=state["round"], deadline=deadline, max_assignments=2, assigned=assigned)
        )
        if state["assignment"] != "none":
            s.execute(
                insert(Assignment).values(
                    id=10**6,  # the same in both runs (the view reads it)
                    round_id=round_id,
                    device_id=device_id,
                    upload_token_hash="old",
                    issued_at=now - timedelta(minutes=1),
                    reported=state["assignment"] == "reported",
                )
            )
    return round_id


def _rows(ctx: ServiceContext) -> dict[str, Any]:
    with ctx.db.read() as s:
        return {
            "devices": [(d.id, d.last_seen_at, d.capabilities) for d in s.scalars(select(Device))],
            "rounds": [(r.id, r.status, r.assigned) for r in s.scalars(select(Round))],
            "assignments": sorted(
                (a.round_id, a.device_id, a.upload_token_hash, a.issued_at, a.reported)
                for a in s.scalars(select(Assignment))
            ),
        }


STATES = [
    {"task": task, "round": rnd, "future": future, "full": full, "assignment": assignment}
    for task in (TASK_RUNNING, TASK_PAUSED, TASK_BUDGET_EXHAUSTED, "completed")
    for rnd in (ROUND_OPEN, ROUND_AGGREGATING, ROUND_AGGREGATED)  # aggregated: no active round
    for future, full, assignment in itertools.product(
        (True, False), (False, True), ("none", "unreported", "reported")
    )
]


def test_the_statement_and_the_transaction_agree_on_every_state(
    world: tuple[ServiceContext, int, str],
) -> None:
    ctx, task_id, device_id = world
    outcomes = set()
    for i, (state, which_task) in enumerate(itertools.product(STATES, ("named", "default", "unknown"))):
        asked = {"named": task_id, "default": None, "unknown": task_id + 100}[which_task]
        caps = CAPS if i % 2 else None
        now = utcnow()
        token_hash = security.hash_secret(f"token-{i}")
        results = []
        for at_once in (False, True):
            _set_state(ctx, task_id, device_id, now, state)
            if at_once:
                with ctx.db.driver_statement() as tx:
                    done = queries.checkin_at_once(tx, asked, device_id, now, caps, token_hash)
                assert done is not None  # nothing concurrent here
                view, step = done.view, rounds.decide(done.view, now)
                if step == "take" and not done.took:
                    step = "round_full"
            else:
                view, step = rounds.checkin_transaction(ctx, device_id, asked, now, caps, token_hash)
            results.append((step, view, _rows(ctx)))
        assert results[0] == results[1], (state, which_task)
        outcomes.add(results[0][0])
    # the states cover every outcome
    assert outcomes == {
        "take", "renew", "round_full", "already_participated", "no_open_round", "no_task", "task_paused",
        "privacy_budget_exhausted", "task_completed",
    }  # fmt: skip


def test_a_concurrent_checkin_of_the_same_device_is_seen(world: tuple[ServiceContext, int, str]) -> None:
    ctx, task_id, device_id = world
    now = utcnow()
    round_id = _set_state(
        ctx,
        task_id,
        device_id,
        now,
        {"task": TASK_RUNNING, "round": ROUND_OPEN, "future": True, "full": False, "assignment": "none"},
    )  # fmt: skip  (one slot left)
    result: list[Any] = []
    checkin = threading.Thread(target=lambda: result.append(rounds.checkin(ctx, device_id, CheckinIn())))
    # a check-in transaction of the same device takes the last slot, and holds the device's row ...
    with ctx.db.driver_write() as tx:
        queries.touch_device(tx, device_id, now, None)
        assert queries.take_assignment(tx, round_id, device_id, "first", now)
        checkin.start()
        # ... while the statement's check-in (its snapshot taken) waits for that row
        # autocommit: each poll its own transaction, since PostgreSQL keeps one pg_stat_activity snapshot
        # per transaction (polling inside one would never see a wait that starts after the first poll)
        with ctx.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
            waiting = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            for _ in range(1000):
                if watch.execute(text(waiting)).scalar():
                    break
                watch.execute(text("SELECT pg_sleep(0.01)"))
            else:
                pytest.fail("the check-in never waited for the device's row")
    checkin.join(timeout=60)
    [answer] = result
    assert isinstance(answer, TrainAction), answer  # the device's assignment, with a new token
    with ctx.db.read() as s:
        assert s.scalars(select(Round.assigned).where(Round.id == round_id)).one() == 2
        [stored] = s.scalars(select(Assignment)).all()
    assert stored.upload_token_hash == security.hash_secret(answer.assignment.upload_token)
