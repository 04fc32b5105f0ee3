"""The check-in fast path (server_api/checkin_fast.py) answers exactly as the FastAPI route does.

Two real apps, each on its own database (SQLite, and PostgreSQL where configured), one with the fast path
and one with it taken out, get the same sequence of check-in requests: valid ones (new assignment, token
rotation, no task, unknown task), refused ones (no, malformed, unknown or wrong tokens; a rate-limited
device) and every kind of body and header the route parses in its own way. Status, headers and body
(minus the random upload token and the clock) must be the same, and so must the state each app is left
in (assignments, devices, refusal counts). The fast path's own app is instrumented to show which requests
it answered itself and which it handed on to the route.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send

from server_api.app import create_app
from server_api.checkin_fast import CheckinFastPath
from server_api.db import scratch_database
from server_api.orm import Assignment, Device
from server_api.services.context import ServiceContext
from tests.conftest import ADMIN, SECRET, make_settings

UNKNOWN_DEVICE = "f" * 32
JSON = "application/json"


class HandOnCounter:
    """Wraps what the fast path hands requests on to (the real rest of the app) and counts check-ins."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/checkin"):
            self.calls += 1
        await self.app(scope, receive, send)


@dataclass
class Side:
    client: TestClient
    tokens: list[str]
    device_ids: list[str]
    handed_on: HandOnCounter | None

    @property
    def ctx(self) -> ServiceContext:
        return self.client.app.state.ctx  # type: ignore[attr-defined,no-any-return]

    def post(self, path: str, headers: dict[str, str], body: bytes, method: str = "POST") -> Any:
        return self.client.request(method, path, headers=headers, content=body, follow_redirects=False)


@contextlib.contextmanager
def _side(tmp_path: Path, url: str | None, fast: bool) -> Iterator[Side]:
    # one request per device and a very slow refill: a device's second request is rate limited
    settings = make_settings(
        tmp_path,
        url,
        rate_limit_per_s=0.0001,
        rate_limit_burst=2.0,
        register_rate_per_s=0,
        register_global_rate_per_s=0,
    )
    app = create_app(settings)
    if not fast:  # the same app with the fast path taken out: every check-in goes through the route
        app.user_middleware = [m for m in app.user_middleware if m.cls is not CheckinFastPath]
    with TestClient(app) as client:
        counter = None
        if fast:
            layer: Any = app.middleware_stack
            while not isinstance(layer, CheckinFastPath):
                layer = layer.app
            layer.app = counter = HandOnCounter(layer.app)
        task = {"name": "t", "architecture": "tiny", "rounds": 2, "policy": {"round_timeout_s": 600}}
        r = client.post("/v1/tasks", json=task, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201 and r.json()["id"] == 1, r.text
        tokens, ids = [], []
        for _ in range(DEVICES):
            r = client.post("/v1/devices", json={"enrollment_secret": SECRET})
            assert r.status_code == 201, r.text
            tokens.append(r.json()["token"])
            ids.append(r.json()["device_id"])
        yield Side(client, tokens, ids, counter)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sides(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    with contextlib.ExitStack() as stack:
        urls: list[str | None] = [None, None]
        if request.param == "postgres":
            base = os.environ.get("FACEFL_TEST_DATABASE_URL")
            if not base:
                pytest.skip("FACEFL_TEST_DATABASE_URL is not set")
            urls = [stack.enter_context(scratch_database(base, "facefl_test")) for _ in range(2)]
        (tmp_path / "fast").mkdir()
        (tmp_path / "route").mkdir()
        fast = stack.enter_context(_side(tmp_path / "fast", urls[0], fast=True))
        route = stack.enter_context(_side(tmp_path / "route", urls[1], fast=False))
        yield fast, route


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


VALID = _json({"task_id": 1, "capabilities": {"accelerator": "cpu", "num_samples": 100}})


@dataclass(frozen=True)
class Case:
    name: str
    status: int  # the answer's status code (the same with and without the fast path)
    fast: bool  # answered by the fast path itself (else handed on to the route)
    body: bytes
    device: int  # whose token (each side registered the same number of devices)
    authorization: str | None = "Bearer {token}"
    content_type: str | None = JSON
    token: Callable[[str], str] = lambda t: t
    method: str = "POST"
    path: str = "/v1/checkin"

    def headers(self, tokens: list[str]) -> dict[str, str]:
        out = {}
        if self.authorization is not None:
            out["Authorization"] = self.authorization.format(token=self.token(tokens[self.device]))
        if self.content_type is not None:
            out["Content-Type"] = self.content_type
        return out


# devices 0-2 answer valid check-ins; each refused or handed-on case has a device of its own, so that a
# rate limit (burst 2) refuses only where a case means it to
CASES = [
    Case("new assignment", 200, True, VALID, 0),
    Case("token rotation", 200, True, VALID, 0),
    Case("rate limited: the device's third request", 429, True, VALID, 0),
    Case("no task id: the oldest task", 200, True, b"{}", 1),
    Case("unknown task", 200, True, _json({"task_id": 999}), 2),
    Case("scheme in lower case, spaces", 200, True, VALID, 3, authorization="bearer   {token}  "),
    Case("wrong secret", 401, True, VALID, 4, token=lambda t: t[:-3] + "xyz"),
    Case("unknown device", 401, True, VALID, 4, token=lambda t: UNKNOWN_DEVICE + "." + t.split(".", 1)[1]),
    Case("malformed token", 401, True, VALID, 4, token=lambda t: "not-a-token"),
    Case("duplicate keys (the last wins)", 200, True, b'{"task_id": 7, "task_id": 1}', 5),
    Case("UTF-16 JSON", 200, True, json.dumps({"task_id": 1}).encode("utf-16"), 6),
    Case("no Authorization", 401, False, VALID, 7, authorization=None),
    Case("Basic scheme", 401, False, VALID, 7, authorization="Basic eDp5"),
    Case("Bearer without credentials", 401, False, VALID, 7, authorization="Bearer "),
    Case("no Content-Type", 422, False, VALID, 8, content_type=None),
    Case("text/plain", 422, False, VALID, 9, content_type="text/plain"),
    Case("charset parameter", 200, False, VALID, 10, content_type="application/json; charset=utf-8"),
    Case("+json subtype", 200, False, _json({"task_id": 999}), 11, content_type="application/vnd.x+json"),
    Case("not JSON", 422, False, b'{"task_id": ', 12),
    Case("not JSON, bad token (the route parses first)", 422, False, b"{", 12, token=lambda t: "x.y"),
    Case("invalid UTF-8", 400, False, b'{"a": "\xff"}', 13),
    Case("empty body", 422, False, b"", 14),
    Case("null", 422, False, b"null", 15),
    Case("a list", 422, False, b"[]", 16),
    Case("unknown field", 422, False, _json({"x": 1}), 17),
    Case("task id as a string", 422, False, _json({"task_id": "1"}), 18),
    Case("task id 0", 422, False, _json({"task_id": 0}), 19),
    Case("task id too large", 422, False, _json({"task_id": 10**20}), 20),
    Case("task id NaN", 422, False, b'{"task_id": NaN}', 21),
    Case("task id true", 422, False, b'{"task_id": true}', 22),
    Case("control character", 422, False, _json({"capabilities": {"accelerator": "a\u0007"}}), 23),
    Case("negative samples", 422, False, _json({"capabilities": {"num_samples": -1}}), 24),
    Case("invalid body, bad token: 401", 401, False, b'{"x": 1}', 25, token=lambda t: "x"),
    Case("invalid body, rate-limited device", 429, False, _json({"x": 1}), 0),
    Case("GET", 405, False, b"", 26, content_type=None, method="GET"),
    Case("trailing slash", 307, False, b"{}", 26, path="/v1/checkin/"),
]
DEVICES = 27

_VARIES = {"upload_token", "deadline", "retry_after_s"}  # random, or read off the clock


def _normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<varies>" if k in _VARIES else _normalized(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def _answer(response: Any) -> dict[str, Any]:
    try:
        body: Any = _normalized(response.json())
    except ValueError:
        body = response.content
    headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "retry-after")}
    retry_after = "retry-after" in response.headers
    return {"status": response.status_code, "headers": headers, "retry_after": retry_after, "body": body}


def _state(side: Side) -> dict[str, Any]:
    index = {d: i for i, d in enumerate(side.device_ids)}
    with side.ctx.db.read() as s:
        assignments = sorted((index[a.device_id], a.round_id) for a in s.scalars(select(Assignment)))
        devices = sorted(
            (index[d.id], d.last_seen_at is not None, json.dumps(d.capabilities, sort_keys=True))
            for d in s.scalars(select(Device))
        )
    refusals = side.client.app.state.refusals  # type: ignore[attr-defined]
    by_device = refusals.of_devices(side.device_ids)
    return {
        "assignments": assignments,
        "devices": devices,
        "refusals": refusals.total(),
        "refusals_by_device": {index[d]: reasons for d, reasons in by_device.items()},
    }


def test_fast_path_answers_as_the_route_does(sides: tuple[Side, Side]) -> None:
    fast, route = sides
    assert fast.handed_on is not None
    for case in CASES:
        answers = []
        handed_on_before = fast.handed_on.calls
        for side in (fast, route):
            response = side.client.request(
                case.method, case.path, headers=case.headers(side.tokens), content=case.body,
                follow_redirects=False,
            )  # fmt: skip
            answers.append(_answer(response))
        assert answers[0] == answers[1], case.name
        assert answers[0]["status"] == case.status, (case.name, answers[0])
        assert fast.handed_on.calls - handed_on_before == (0 if case.fast else 1), case.name
    assert _state(fast) == _state(route)
