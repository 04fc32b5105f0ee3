"""The operator's actions and views behind the console, through the admin REST API on a real uvicorn
server: pause/resume a task, abandon the open round, a round's participants, the device roster, pages
of rounds; and the console login throttle."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from device_sdk import FederatedClient
from device_sdk.client import Assignment
from tests.conftest import ADMIN, SECRET, LiveServer

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def api(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30, headers=ADMIN_HEADERS) as c:
        yield c


def make_task(api: httpx.Client, **policy: Any) -> dict[str, Any]:
    body = {"name": "ops", "architecture": "tiny", "embedding_dim": 8, "rounds": 3, "policy": policy}
    r = api.post("/v1/tasks", json=body)
    assert r.status_code == 201, r.text
    task: dict[str, Any] = r.json()
    return task


def device(server: LiveServer, name: str) -> FederatedClient:
    client = FederatedClient(server.base_url, timeout=30)
    client.register(SECRET, name=name)
    return client


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def report(client: FederatedClient, a: Assignment) -> None:
    base = client.download_model(a.base_version)
    client.upload_update(a, {k: np.zeros_like(v) for k, v in base.items()}, num_samples=3)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/tasks/1/pause"), ("POST", "/v1/tasks/1/resume"), ("POST", "/v1/rounds/1/abandon"),
     ("GET", "/v1/rounds/1/participants"), ("GET", "/v1/devices")],
)  # fmt: skip
def test_operator_endpoints_are_admin_only(
    server: LiveServer, api: httpx.Client, method: str, path: str
) -> None:
    make_task(api)
    phone = device(server, "phone")
    with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
        assert anonymous.request(method, path).status_code == 401
        refused = anonymous.request(method, path, headers={"Authorization": f"Bearer {phone.token}"})
        assert refused.status_code == 403
    phone.close()
    assert api.get("/v1/tasks/1").json()["status"] == "running"
    assert api.get("/v1/rounds/1").json()["status"] == "open"


def test_a_paused_task_hands_out_nothing_and_opens_no_round_until_resumed(
    server: LiveServer, api: httpx.Client
) -> None:
    task = make_task(api, target_reports=2, min_reports=2, round_timeout_s=1.5)
    task_id, first = task["id"], task["current_round"]["id"]
    phone = device(server, "phone")
    assert isinstance(phone.checkin(task_id), Assignment)  # selected before the pause
    paused = api.post(f"/v1/tasks/{task_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert api.post(f"/v1/tasks/{task_id}/pause").json()["status"] == "paused"  # idempotent
    late = device(server, "late")
    answer = late.checkin(task_id)
    assert not isinstance(answer, Assignment) and answer.reason == "task_paused"
    # the open round runs to its deadline (short of its minimum: abandoned), and no next round opens
    wait_until(lambda: api.get(f"/v1/rounds/{first}").json()["status"] == "abandoned")
    time.sleep(1.0)  # several ticks: an orphaned running task would get a round within one
    assert api.get(f"/v1/tasks/{task_id}").json()["current_round"] is None
    assert len(api.get(f"/v1/tasks/{task_id}/rounds").json()) == 1
    resumed = api.post(f"/v1/tasks/{task_id}/resume").json()
    assert resumed["status"] == "running" and resumed["current_round"]["number"] == 2
    assert api.post(f"/v1/tasks/{task_id}/resume").json()["current_round"]["number"] == 2  # idempotent
    assert isinstance(late.checkin(task_id), Assignment)
    phone.close()
    late.close()


def test_a_completed_task_cannot_be_paused_or_resumed(server: LiveServer, api: httpx.Client) -> None:
    r = api.post("/v1/tasks", json={"name": "one", "architecture": "tiny", "embedding_dim": 8, "rounds": 1,
                                    "policy": {"target_reports": 1, "min_reports": 1}})  # fmt: skip
    task_id = r.json()["id"]
    phone = device(server, "phone")
    a = phone.checkin(task_id)
    assert isinstance(a, Assignment)
    report(phone, a)
    phone.close()
    wait_until(lambda: api.get(f"/v1/tasks/{task_id}").json()["status"] == "completed")
    for action in ("pause", "resume"):
        refused = api.post(f"/v1/tasks/{task_id}/{action}")
        assert refused.status_code == 409 and refused.json()["code"] == "task_done"
    assert api.get(f"/v1/tasks/{task_id}").json()["status"] == "completed"
    assert api.post("/v1/tasks/987654/pause").status_code == 404


def test_abandon_the_open_round_then_participants_show_who_dropped(
    server: LiveServer, api: httpx.Client
) -> None:
    task = make_task(api, target_reports=3, min_reports=2)
    round_id = task["current_round"]["id"]
    reporter, quiet = device(server, "reporter"), device(server, "quiet")
    a = reporter.checkin(task["id"])
    assert isinstance(a, Assignment)
    assert isinstance(quiet.checkin(task["id"]), Assignment)
    report(reporter, a)
    rows = api.get(f"/v1/rounds/{round_id}/participants").json()
    assert [(r["device_id"], r["status"]) for r in rows] == [
        (reporter.device_id, "reported"),
        (quiet.device_id, "pending"),
    ]
    assert rows[0]["update_bytes"] > 0 and rows[0]["num_samples"] == 3 and rows[0]["reported_at"] is not None
    assert rows[1]["update_bytes"] is None and rows[1]["reported_at"] is None

    abandoned = api.post(f"/v1/rounds/{round_id}/abandon")
    assert abandoned.status_code == 200, abandoned.text
    assert abandoned.json()["status"] == "abandoned" and abandoned.json()["result_version"] is None
    assert [r["status"] for r in api.get(f"/v1/rounds/{round_id}/participants").json()] == [
        "reported",
        "dropped",
    ]
    after = api.get(f"/v1/tasks/{task['id']}").json()
    assert (
        after["current_round"]["number"] == 2
        and after["current_round"]["base_version"] == task["current_version"]
    )
    again = api.post(f"/v1/rounds/{round_id}/abandon")
    assert again.status_code == 409 and again.json()["code"] == "round_not_open"
    assert api.post("/v1/rounds/987654/abandon").status_code == 404
    assert api.get("/v1/rounds/987654/participants").status_code == 404
    reporter.close()
    quiet.close()


def test_device_roster_counts_and_pages(server: LiveServer, api: httpx.Client) -> None:
    task = make_task(api)
    before = api.get("/v1/devices", params={"limit": 1000}).json()["total"]
    seen, never = device(server, "seen"), device(server, "never")
    assert isinstance(seen.checkin(task["id"]), Assignment)
    roster = api.get("/v1/devices", params={"limit": 1000}).json()
    assert roster["total"] == before + 2
    ids = [d["id"] for d in roster["devices"]]
    assert ids[0] == seen.device_id  # most recently seen first, never seen last
    row = roster["devices"][0]
    assert row["name"] == "seen" and row["assignments"] == 1 and row["reports"] == 0 and row["last_seen_at"]
    never_row = next(d for d in roster["devices"] if d["id"] == never.device_id)
    assert never_row["last_seen_at"] is None and never_row["assignments"] == 0
    page = api.get("/v1/devices", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == roster["total"] and [d["id"] for d in page["devices"]] == ids[1:2]
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "1.5"}):
        assert api.get("/v1/devices", params=bad).status_code == 422
    seen.close()
    never.close()


def test_rounds_page_is_the_newest_below_before(server: LiveServer, api: httpx.Client) -> None:
    task = make_task(api)
    for _ in range(3):  # rounds 1..3 abandoned, round 4 open
        current = api.get(f"/v1/tasks/{task['id']}").json()["current_round"]["id"]
        assert api.post(f"/v1/rounds/{current}/abandon").status_code == 200

    def numbers(**params: int) -> list[int]:
        return [r["number"] for r in api.get(f"/v1/tasks/{task['id']}/rounds", params=params).json()]

    assert numbers() == [1, 2, 3, 4]
    assert numbers(limit=2) == [3, 4]
    assert numbers(limit=2, before=3) == [1, 2]
    assert numbers(before=2) == [1]
    assert numbers(limit=5, before=1) == []
    assert api.get(f"/v1/tasks/{task['id']}/rounds", params={"limit": 0}).status_code == 422


def test_model_versions_page_is_the_newest_below_before(api: httpx.Client) -> None:
    mine = [make_task(api)["current_version"] for _ in range(3)]  # versions of other tasks in between

    def versions(**params: int) -> list[int]:
        return [v["version"] for v in api.get("/v1/models", params=params).json()]

    everything = versions()
    assert everything == sorted(everything) and mine == everything[-3:]
    assert versions(limit=2) == mine[1:]
    assert versions(limit=2, before=mine[2]) == everything[-3:-1]
    task_id = api.get(f"/v1/models/{mine[0]}/info").json()["task_id"]
    assert versions(task_id=task_id, limit=5) == [mine[0]]
    assert versions(task_id=task_id, before=mine[0]) == []
    assert api.get("/v1/models", params={"limit": 10_001}).status_code == 422


def test_login_throttle_blocks_a_guessing_address_only(server: LiveServer) -> None:
    # the guesser talks from 127.0.0.2 (loopback): other tests' logins from 127.0.0.1 stay unaffected
    guesser = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=server.base_url, timeout=30, transport=guesser) as c:
        statuses = [c.post("/console/login", data={"token": f"guess-{i}"}).status_code for i in range(14)]
        assert statuses[:10] == [401] * 10  # the burst
        assert statuses[-1] == 429
        blocked = c.post("/console/login", data={"token": ADMIN})  # refused before any comparison
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
        assert "set-cookie" not in blocked.headers
    with httpx.Client(base_url=server.base_url, timeout=30) as other:
        assert other.post("/console/login", data={"token": ADMIN}).status_code == 303
