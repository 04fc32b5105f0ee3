"""Hostile input beyond test_api's refusals: rate limits (429 + Retry-After), /metrics, /health on a dead
database, JSON logs. Every refusal changes no state."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server_api import logs
from server_api.app import create_app
from server_api.db import Database
from server_api.ratelimit import RateLimiter
from tests.conftest import make_settings
from tests.server_api.test_api import ADMIN_H, Api, unchanged


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_and_refusal_consumes_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a") == pytest.approx(0.5)  # empty: one token comes in 1/rate seconds
    assert limiter.check("a") == pytest.approx(0.5)  # refused requests did not push the wait further
    assert limiter.check("b") == 0.0  # buckets are per key
    clock.t += 0.5
    assert limiter.check("a") == 0.0 and limiter.check("a") == pytest.approx(0.5)
    clock.t += 100
    assert [limiter.check("a") for _ in range(4)][-1] > 0  # refill is capped at the burst
    assert RateLimiter.retry_after_header(0.01) == "1" and RateLimiter.retry_after_header(1.2) == "2"


def test_token_bucket_keeps_at_most_max_keys() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=2, clock=Clock())
    for key in "abc":
        assert limiter.check(key) == 0.0
    assert len(limiter._buckets) == 2 and "a" not in limiter._buckets


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Api]:
    settings = make_settings(tmp_path, rate_limit_per_s=0.01, rate_limit_burst=3)
    with TestClient(create_app(settings)) as client:
        yield Api(client)


def test_rate_limited_device_gets_429_with_retry_after_and_nothing_changes(limited: Api) -> None:
    api = limited
    api.task(policy={"target_reports": 5, "min_reports": 1})
    dev, other = api.device(), api.device()
    a = api.assignment(dev)  # 1 token
    body = api.delta_bytes(a)  # model download: 2 tokens (the admin is never limited)
    assert api.c.get(f"/v1/models/{a['base_version']}", headers=dev).status_code == 200
    assert api.c.get(f"/v1/rounds/{a['round_id']}", headers=dev).status_code == 200  # bucket now empty
    for action in (
        lambda: api.upload(dev, a, body),
        lambda: api.c.post("/v1/checkin", json={}, headers=dev),
        lambda: api.c.get("/v1/tasks/1", headers=dev),
    ):
        r = unchanged(api, action)
        assert r.status_code == 429 and r.json()["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
    assert api.c.post("/v1/checkin", json={}, headers=other).status_code == 200  # others unaffected
    assert api.c.get("/v1/tasks/1", headers=ADMIN_H).status_code == 200


def test_rate_limit_zero_turns_it_off(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, rate_limit_per_s=0, rate_limit_burst=1))) as client:
        api = Api(client)
        dev = api.device()
        assert all(client.post("/v1/checkin", json={}, headers=dev).status_code == 200 for _ in range(10))


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, rest = key.partition("{")
        got = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p) if rest else {}
        if metric == name and {k: v.strip('"') for k, v in got.items()} == labels:
            return float(value)
    return 0.0


def test_metrics_count_rounds_reports_refusals_and_bytes(tmp_path: Path) -> None:
    from tests.server_api.test_api import wait_for

    with TestClient(create_app(make_settings(tmp_path))) as client:
        api = Api(client)
        before = client.get("/metrics").text
        api.task()  # target 2
        devs = [api.device() for _ in range(2)]
        assignments = [api.assignment(d) for d in devs]
        assert client.post("/v1/checkin", json={}, headers={"Authorization": "Bearer x.y"}).status_code == 401
        body = api.delta_bytes(assignments[0])
        for d, a in zip(devs, assignments, strict=True):
            assert api.upload(d, a, body).status_code == 202
        assert api.upload(devs[0], assignments[0], body).status_code in (409, 410)
        wait_for(lambda: client.get("/v1/tasks/1", headers=ADMIN_H).json()["aggregated_rounds"] == 1)
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        after = r.text

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("facefl_rounds_opened_total") == 2  # round 1 at creation, round 2 after aggregating
    assert delta("facefl_rounds_closed_total", outcome="aggregated") == 1
    assert delta("facefl_reports_accepted_total") == 2
    assert delta("facefl_upload_bytes_total") == 2 * len(body)
    assert delta("facefl_refusals_total", status="401", reason="unauthorized") == 1
    assert delta("facefl_aggregation_seconds_count") == 1


def test_health_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as client:
        assert client.get("/v1/health").json() == {"status": "ok", "db": "ok"}
        ctx = client.app.state.ctx  # type: ignore[attr-defined]
        good = ctx.db
        ctx.db = Database("postgresql://nobody@127.0.0.1:1/none")  # a real connection that fails
        try:
            r = client.get("/v1/health")
            assert r.status_code == 503 and r.json()["db"] == "unreachable"
        finally:
            ctx.db.dispose()
            ctx.db = good


def test_json_logs_one_object_per_line_with_round_and_device(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, log_format="json")
    try:
        with TestClient(create_app(settings)) as client:
            api = Api(client)
            api.task(policy={"target_reports": 5, "min_reports": 1})
            dev = api.device()
            a = api.assignment(dev)
            assert api.upload(dev, a, b"garbage").status_code == 422
            assert api.upload(dev, a, api.delta_bytes(a)).status_code == 202
        lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    finally:
        logs.configure("plain", "INFO")
    accepted = [x for x in lines if x["msg"] == "update accepted"]
    refused = [x for x in lines if x["msg"].startswith("request refused")]
    assert len(accepted) == 1 and accepted[0]["round_id"] == a["round_id"] and accepted[0]["device_id"]
    assert refused and refused[0]["code"] == "bad_update" and refused[0]["round_id"] == a["round_id"]
    assert refused[0]["device_id"] == accepted[0]["device_id"] and refused[0]["level"] == "INFO"
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)


def test_plain_log_format_has_the_fields_too() -> None:
    record = logging.makeLogRecord({"msg": "update accepted", "levelname": "INFO", "round_id": 3})
    assert logs.PlainFormatter().format(record).endswith("update accepted round_id=3")
    assert json.loads(logs.JsonFormatter().format(record))["round_id"] == 3
