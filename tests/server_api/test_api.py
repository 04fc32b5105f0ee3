"""Every endpoint and every refusal, through the ASGI app on a real SQLite file.

Each refusal asserts the status code AND that no row or blob changed (a refused request changes no state).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from facefl import codec
from server_api.app import create_app
from server_api.orm import Assignment, Device, ModelVersion, Round, Task, Update
from server_api.services.context import ServiceContext
from tests.conftest import ADMIN, SECRET, make_settings

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


def task_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "t",
        "rounds": 3,
        "policy": {"target_reports": 2, "min_reports": 1, "over_selection": 1.5, "round_timeout_s": 600},
    }
    body.update(overrides)
    return body


class Api:
    def __init__(self, client: TestClient) -> None:
        self.c = client

    @property
    def ctx(self) -> ServiceContext:
        return self.c.app.state.ctx  # type: ignore[attr-defined,no-any-return]

    def device(self) -> dict[str, str]:
        r = self.c.post("/v1/devices", json={"enrollment_secret": SECRET, "name": "phone"})
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def task(self, **overrides: Any) -> dict[str, Any]:
        r = self.c.post("/v1/tasks", json=task_body(**overrides), headers=ADMIN_H)
        assert r.status_code == 201, r.text
        return r.json()

    def assignment(self, headers: dict[str, str]) -> dict[str, Any]:
        r = self.c.post("/v1/checkin", json={}, headers=headers)
        assert r.status_code == 200 and r.json()["action"] == "train", r.text
        return r.json()["assignment"]

    def weights(self, version: int) -> dict[str, np.ndarray]:
        r = self.c.get(f"/v1/models/{version}", headers=ADMIN_H)
        assert r.status_code == 200
        return codec.decode(r.content)

    def upload(
        self, headers: dict[str, str], a: dict[str, Any], body: bytes, num_samples: int = 10, **extra: str
    ) -> Any:
        return self.c.post(
            f"/v1/rounds/{a['round_id']}/updates?num_samples={num_samples}",
            content=body,
            headers={**headers, "X-Upload-Token": a["upload_token"], **extra},
        )

    def delta_bytes(self, a: dict[str, Any], value: float = 0.01) -> bytes:
        return codec.encode({k: np.full_like(v, value) for k, v in self.weights(a["base_version"]).items()})

    def snapshot(self) -> dict[str, Any]:
        with self.ctx.db.read() as s:
            counts = {
                m.__name__: s.scalar(select(func.count()).select_from(m))
                for m in (Device, Task, ModelVersion, Round, Assignment, Update)
            }
            rounds = [
                (r.id, r.status, r.assigned, r.reported) for r in s.scalars(select(Round).order_by(Round.id))
            ]
            reported = sorted(a.id for a in s.scalars(select(Assignment).where(Assignment.reported)))
        return {"counts": counts, "rounds": rounds, "reported": reported, "blobs": self.ctx.blobs.count()}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    with TestClient(create_app(make_settings(tmp_path, url, max_upload_bytes=4 * 1024 * 1024))) as client:
        yield Api(client)


def unchanged(api: Api, action: Callable[[], Any]) -> Any:
    before = api.snapshot()
    result = action()
    assert api.snapshot() == before
    return result


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


# --- health, docs --------------------------------------------------------------------------------


def test_health_and_openapi(api: Api) -> None:
    assert api.c.get("/v1/health").json() == {"status": "ok", "db": "ok"}
    paths = api.c.get("/openapi.json").json()["paths"]
    assert {
        "/v1/devices",
        "/v1/tasks",
        "/v1/checkin",
        "/v1/rounds/{round_id}/updates",
        "/v1/models/{version}",
    } <= set(paths)


# --- devices --------------------------------------------------------------------------------------


def test_register_returns_token_stored_hashed(api: Api) -> None:
    r = api.c.post("/v1/devices", json={"enrollment_secret": SECRET, "capabilities": {"num_samples": 5}})
    assert r.status_code == 201
    token = r.json()["token"]
    with api.ctx.db.read() as s:
        dev = s.get(Device, r.json()["device_id"])
        assert dev is not None and token.split(".", 1)[1] not in dev.token_hash and len(dev.token_hash) == 64


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"enrollment_secret": "wrong-secret"}, 401),
        ({}, 422),
        ({"enrollment_secret": SECRET, "unexpected": 1}, 422),
        ({"enrollment_secret": SECRET, "name": "x" * 500}, 422),
    ],
)
def test_register_refusals_store_nothing(api: Api, body: dict[str, Any], status: int) -> None:
    r = unchanged(api, lambda: api.c.post("/v1/devices", json=body))
    assert r.status_code == status and "detail" in r.json()


def test_bad_json_is_422(api: Api) -> None:
    r = unchanged(
        api,
        lambda: api.c.post("/v1/devices", content=b"{not json", headers={"Content-Type": "application/json"}),
    )
    assert r.status_code == 422


# --- tasks ----------------------------------------------------------------------------------------


def test_create_task_builds_version_and_opens_round(api: Api) -> None:
    t = api.task()
    assert t["current_version"] == 1 and t["status"] == "running" and t["image_size"] == 64
    rnd = t["current_round"]
    assert rnd["number"] == 1 and rnd["status"] == "open" and rnd["max_assignments"] == 3
    assert api.c.get("/v1/tasks", headers=ADMIN_H).json()[0]["id"] == t["id"]
    assert api.c.get(f"/v1/tasks/{t['id']}/rounds", headers=ADMIN_H).json()[0]["id"] == rnd["id"]
    info = api.c.get("/v1/models/1/info", headers=ADMIN_H).json()
    assert info["parent_version"] is None and info["task_id"] == t["id"]


def test_task_requires_admin(api: Api) -> None:
    dev = api.device()
    assert unchanged(api, lambda: api.c.post("/v1/tasks", json=task_body())).status_code == 401
    assert unchanged(api, lambda: api.c.post("/v1/tasks", json=task_body(), headers=dev)).status_code == 403
    bad = {"Authorization": "Bearer not-the-admin"}
    assert unchanged(api, lambda: api.c.post("/v1/tasks", json=task_body(), headers=bad)).status_code == 401


@pytest.mark.parametrize(
    "overrides",
    [
        {"algorithm": "fedsgd"},
        {"architecture": "resnet9000"},
        {"rounds": 0},
        {"algorithm": "fedprox"},  # fedprox without mu
        {"hyperparams": {"lr": -1}},
        {"hyperparams": {"nope": 1}},
        {"policy": {"target_reports": 2, "min_reports": 5}},
        {"policy": {"target_reports": 2, "over_selection": 0.5}},
        {"initial_version": 99},
    ],
)
def test_invalid_tasks_are_refused(api: Api, overrides: dict[str, Any]) -> None:
    r = unchanged(api, lambda: api.c.post("/v1/tasks", json=task_body(**overrides), headers=ADMIN_H))
    assert r.status_code == 422, r.text


def test_task_from_initial_version(api: Api) -> None:
    api.task()
    t2 = api.task(initial_version=1, name="second")
    assert t2["current_version"] == 1
    r = unchanged(
        api,
        lambda: api.c.post(
            "/v1/tasks", json=task_body(initial_version=1, architecture="mobilefacenet"), headers=ADMIN_H
        ),
    )
    assert r.status_code == 422 and r.json()["code"] == "architecture_mismatch"


def test_unknown_things_are_404(api: Api) -> None:
    for path in ("/v1/tasks/9", "/v1/rounds/9", "/v1/models/9", "/v1/models/9/info", "/v1/tasks/9/rounds"):
        assert api.c.get(path, headers=ADMIN_H).status_code == 404, path


# --- check-in -------------------------------------------------------------------------------------


def test_checkin_without_task_waits(api: Api) -> None:
    r = api.c.post("/v1/checkin", json={}, headers=api.device())
    assert r.status_code == 200 and r.json()["action"] == "wait" and r.json()["reason"] == "no_task"
    assert int(r.headers["Retry-After"]) >= 1


def test_checkin_auth(api: Api) -> None:
    api.task()
    dev_id = api.device()["Authorization"].split()[1].split(".")[0]
    for headers in ({}, {"Authorization": "Bearer garbage"}, {"Authorization": f"Bearer {dev_id}.forged"}):
        assert (
            unchanged(api, lambda h=headers: api.c.post("/v1/checkin", json={}, headers=h)).status_code == 401
        )


def test_over_selection_then_round_full_with_retry_after(api: Api) -> None:
    api.task()  # target 2, over-selection 1.5 -> 3 assignments
    devices = [api.device() for _ in range(4)]
    for d in devices[:3]:
        api.assignment(d)
    r = unchanged(api, lambda: api.c.post("/v1/checkin", json={}, headers=devices[3]))
    assert r.json()["action"] == "wait" and r.json()["reason"] == "round_full"
    assert int(r.headers["Retry-After"]) >= 1


def test_checkin_again_rotates_upload_token(api: Api) -> None:
    api.task()
    dev = api.device()
    first = api.assignment(dev)
    second = api.assignment(dev)
    assert first["round_id"] == second["round_id"] and first["upload_token"] != second["upload_token"]
    body = api.delta_bytes(first)
    assert unchanged(api, lambda: api.upload(dev, first, body)).status_code == 403
    assert api.upload(dev, second, body).status_code == 202
    r = api.c.post("/v1/checkin", json={}, headers=dev)
    assert r.json()["reason"] == "already_participated"


# --- models ---------------------------------------------------------------------------------------


def test_model_download_etag_and_auth(api: Api) -> None:
    api.task()
    dev = api.device()
    r = api.c.get("/v1/models/1", headers=dev)
    assert (
        r.status_code == 200
        and r.headers["etag"].strip('"') == api.c.get("/v1/models/1/info", headers=dev).json()["sha256"]
    )
    assert api.c.get("/v1/models/1", headers={**dev, "If-None-Match": r.headers["etag"]}).status_code == 304
    assert api.c.get("/v1/models/1").status_code == 401
    assert codec.decode(r.content)  # safetensors


# --- updates: the accepted path and every refusal -------------------------------------------------


def test_upload_accepted_then_round_aggregates(api: Api) -> None:
    t = api.task()
    d1, d2 = api.device(), api.device()
    a1, a2 = api.assignment(d1), api.assignment(d2)
    before = api.weights(1)
    r = api.upload(d1, a1, api.delta_bytes(a1, 0.01), num_samples=10, **{"X-Metrics": '{"loss": 2.0}'})
    assert r.status_code == 202 and r.json()["reports"] == 1
    r = api.upload(d2, a2, api.delta_bytes(a2, 0.04), num_samples=30, **{"X-Metrics": '{"loss": 1.0}'})
    assert r.status_code == 202 and r.json()["reports"] == 2

    wait_for(
        lambda: api.c.get(f"/v1/rounds/{a1['round_id']}", headers=ADMIN_H).json()["status"] == "aggregated"
    )
    rnd = api.c.get(f"/v1/rounds/{a1['round_id']}", headers=ADMIN_H).json()
    assert rnd["result_version"] == 2 and rnd["metrics"]["train_loss"] == pytest.approx((2.0 * 10 + 30) / 40)
    after = api.weights(2)
    for k in before:  # weighted mean delta: (10*0.01 + 30*0.04) / 40 = 0.0325
        np.testing.assert_allclose(after[k], before[k] + 0.0325, rtol=1e-5, atol=1e-6)
    task = api.c.get(f"/v1/tasks/{t['id']}", headers=ADMIN_H).json()
    assert task["current_version"] == 2 and task["current_round"]["number"] == 2
    lineage = api.c.get(f"/v1/models?task_id={t['id']}", headers=ADMIN_H).json()
    assert [(m["version"], m["parent_version"], m["round_id"]) for m in lineage] == [
        (1, None, None),
        (2, 1, a1["round_id"]),
    ]


@pytest.fixture
def assigned(api: Api) -> tuple[dict[str, str], dict[str, Any]]:
    api.task(policy={"target_reports": 5, "min_reports": 1, "update_norm_bound": 100.0})
    dev = api.device()
    return dev, api.assignment(dev)


def test_upload_with_forged_device_token_is_401(
    api: Api, assigned: tuple[dict[str, str], dict[str, Any]]
) -> None:
    dev, a = assigned
    body = api.delta_bytes(a)
    for h in ({}, {"Authorization": "Bearer x.y"}, {"Authorization": dev["Authorization"] + "x"}):
        r = unchanged(
            api,
            lambda h=h: api.c.post(
                f"/v1/rounds/{a['round_id']}/updates?num_samples=1",
                content=body,
                headers={**h, "X-Upload-Token": a["upload_token"]},
            ),
        )
        assert r.status_code == 401


def test_upload_with_another_devices_token_is_403(
    api: Api, assigned: tuple[dict[str, str], dict[str, Any]]
) -> None:
    _, a = assigned
    other = api.device()
    api.assignment(other)
    r = unchanged(api, lambda: api.upload(other, a, api.delta_bytes(a)))
    assert r.status_code == 403


def test_second_upload_is_409(api: Api, assigned: tuple[dict[str, str], dict[str, Any]]) -> None:
    dev, a = assigned
    assert api.upload(dev, a, api.delta_bytes(a)).status_code == 202
    r = unchanged(api, lambda: api.upload(dev, a, api.delta_bytes(a, 0.02)))
    assert r.status_code == 409


def test_upload_to_unknown_round_is_404(api: Api, assigned: tuple[dict[str, str], dict[str, Any]]) -> None:
    dev, a = assigned
    r = unchanged(api, lambda: api.upload(dev, {**a, "round_id": 999}, api.delta_bytes(a)))
    assert r.status_code == 404


def test_upload_to_closed_round_is_410(api: Api) -> None:
    api.task()  # target 2
    devs = [api.device() for _ in range(3)]
    assignments = [api.assignment(d) for d in devs]  # over-selected: 3 for a target of 2
    for d, a in zip(devs[:2], assignments[:2], strict=True):
        assert api.upload(d, a, api.delta_bytes(a)).status_code == 202
    wait_for(
        lambda: (
            api.c.get(f"/v1/rounds/{assignments[0]['round_id']}", headers=ADMIN_H).json()["status"]
            == "aggregated"
        )
    )
    late = api.delta_bytes(assignments[2])
    r = unchanged(api, lambda: api.upload(devs[2], assignments[2], late))
    assert r.status_code == 410


def test_upload_after_deadline_is_410_and_round_is_abandoned(api: Api) -> None:
    api.task(policy={"target_reports": 2, "min_reports": 2, "round_timeout_s": 0.6})
    dev = api.device()
    a = api.assignment(dev)
    body = api.delta_bytes(a)
    time.sleep(0.7)
    r = api.upload(dev, a, body)
    assert r.status_code == 410
    wait_for(
        lambda: api.c.get(f"/v1/rounds/{a['round_id']}", headers=ADMIN_H).json()["status"] == "abandoned"
    )
    rounds = api.c.get("/v1/tasks/1/rounds", headers=ADMIN_H).json()
    assert rounds[1]["number"] == 2 and rounds[1]["base_version"] == rounds[0]["base_version"] == 1
    with api.ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Update)) == 0


def test_deadline_with_minimum_reports_aggregates(api: Api) -> None:
    api.task(policy={"target_reports": 3, "min_reports": 1, "round_timeout_s": 0.8})
    dev = api.device()
    a = api.assignment(dev)
    assert api.upload(dev, a, api.delta_bytes(a)).status_code == 202
    wait_for(
        lambda: api.c.get(f"/v1/rounds/{a['round_id']}", headers=ADMIN_H).json()["status"] == "aggregated"
    )


def test_body_above_limit_is_413_declared_and_streamed(
    api: Api, assigned: tuple[dict[str, str], dict[str, Any]]
) -> None:
    dev, a = assigned
    big = b"\0" * (4 * 1024 * 1024 + 1)
    assert unchanged(api, lambda: api.upload(dev, a, big)).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        for _ in range(80):
            yield b"\0" * 65536

    r = unchanged(
        api,
        lambda: api.c.post(
            f"/v1/rounds/{a['round_id']}/updates?num_samples=1",
            content=chunks(),
            headers={**dev, "X-Upload-Token": a["upload_token"]},
        ),
    )
    assert r.status_code == 413
    assert not api.ctx.blobs.staging_files()


def _bad_payloads(w: dict[str, np.ndarray]) -> dict[str, bytes]:
    names = list(w)
    good = {k: np.zeros_like(v) for k, v in w.items()}
    wrong_name = dict(good)
    wrong_name["intruder"] = wrong_name.pop(names[0])
    wrong_shape = dict(good)
    wrong_shape[names[0]] = np.zeros((3, 3), np.float32)
    missing = {k: v for k, v in good.items() if k != names[-1]}
    nan = dict(good)
    nan[names[0]] = np.full_like(good[names[0]], np.nan)
    inf = dict(good)
    inf[names[1]] = np.full_like(good[names[1]], np.inf)
    huge = {k: np.full_like(v, 10.0) for k, v in w.items()}  # norm far above the bound of 100
    int_payload = codec.encode({names[0]: np.zeros(good[names[0]].shape, np.int32)})
    return {
        "wrong_name": codec.encode(wrong_name),
        "wrong_shape": codec.encode(wrong_shape),
        "missing": codec.encode(missing),
        "nan": codec.encode(nan),
        "inf": codec.encode(inf),
        "norm": codec.encode(huge),
        "int_dtype": int_payload,
        "garbage": b"\x00\x01garbage" * 100,
        "truncated": codec.encode(good)[:-10],
        "empty": b"",
    }


@pytest.mark.parametrize(
    "case",
    [
        "wrong_name",
        "wrong_shape",
        "missing",
        "nan",
        "inf",
        "norm",
        "int_dtype",
        "garbage",
        "truncated",
        "empty",
    ],
)
def test_invalid_payloads_are_422(
    api: Api, assigned: tuple[dict[str, str], dict[str, Any]], case: str
) -> None:
    dev, a = assigned
    body = _bad_payloads(api.weights(a["base_version"]))[case]
    r = unchanged(api, lambda: api.upload(dev, a, body))
    assert r.status_code == 422, r.text
    assert r.json()["code"] in {"bad_update", "norm_too_large"}
    assert api.upload(dev, a, api.delta_bytes(a)).status_code == 202  # the token was not consumed


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("num_samples=0", {}),
        ("num_samples=abc", {}),
        ("", {}),
        ("num_samples=5", {"X-Metrics": "{bad"}),
        ("num_samples=5", {"X-Metrics": '{"loss": "high"}'}),
        ("num_samples=5", {"X-Metrics": "[1, 2]"}),
    ],
)
def test_bad_upload_parameters_are_422(
    api: Api, assigned: tuple[dict[str, str], dict[str, Any]], query: str, headers: dict[str, str]
) -> None:
    dev, a = assigned
    body = api.delta_bytes(a)
    r = unchanged(
        api,
        lambda: api.c.post(
            f"/v1/rounds/{a['round_id']}/updates?{query}",
            content=body,
            headers={**dev, "X-Upload-Token": a["upload_token"], **headers},
        ),
    )
    assert r.status_code == 422, r.text


def test_missing_upload_token_is_422(api: Api, assigned: tuple[dict[str, str], dict[str, Any]]) -> None:
    dev, a = assigned
    r = unchanged(
        api,
        lambda: api.c.post(f"/v1/rounds/{a['round_id']}/updates?num_samples=1", content=b"x", headers=dev),
    )
    assert r.status_code == 422


def test_float16_updates_are_accepted(api: Api, assigned: tuple[dict[str, str], dict[str, Any]]) -> None:
    dev, a = assigned
    w = api.weights(a["base_version"])
    body = codec.encode({k: np.full(v.shape, 0.01, np.float16) for k, v in w.items()})
    assert api.upload(dev, a, body).status_code == 202


def test_settings_refuse_missing_secrets_outside_dev_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from server_api.settings import Settings

    for var in ("FACEFL_ADMIN_TOKEN", "FACEFL_ENROLLMENT_SECRET", "FACEFL_DEV_MODE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValidationError, match="FACEFL_ADMIN_TOKEN"):
        Settings()
    monkeypatch.setenv("FACEFL_DEV_MODE", "1")
    assert Settings().admin_token_value == "dev-admin-token"


# --- model import (a pretrained checkpoint as a root version) ------------------------------------


def _small_weights(embedding_dim: int = 128) -> dict[str, np.ndarray]:
    from facefl.models import build_backbone, state_to_numpy

    return state_to_numpy(build_backbone("small", embedding_dim, seed=5))


def test_import_model_then_task_starts_from_it(api: Api) -> None:
    w = _small_weights(64)
    body = codec.encode(w, metadata={"architecture": "small", "embedding_dim": "64"})
    assert unchanged(api, lambda: api.c.post("/v1/models", content=body)).status_code == 401
    dev = api.device()
    assert unchanged(api, lambda: api.c.post("/v1/models", content=body, headers=dev)).status_code == 403
    r = api.c.post("/v1/models", content=body, headers=ADMIN_H)
    assert r.status_code == 201, r.text
    mv = r.json()
    assert mv["parent_version"] is None and mv["task_id"] is None and mv["embedding_dim"] == 64
    downloaded = api.weights(mv["version"])
    for k in w:
        np.testing.assert_array_equal(downloaded[k], w[k])
    t = api.task(initial_version=mv["version"])
    assert t["current_version"] == mv["version"] and t["embedding_dim"] == 64
    r = unchanged(
        api,
        lambda: api.c.post(
            "/v1/tasks", json=task_body(initial_version=mv["version"], embedding_dim=128), headers=ADMIN_H
        ),
    )
    assert r.status_code == 422 and r.json()["code"] == "embedding_dim_mismatch"


def test_import_model_with_query_architecture(api: Api) -> None:
    r = api.c.post("/v1/models?architecture=small", content=codec.encode(_small_weights()), headers=ADMIN_H)
    assert r.status_code == 201 and r.json()["embedding_dim"] == 128


@pytest.mark.parametrize(
    "case", ["no_architecture", "unknown_architecture", "wrong_shapes", "nan", "garbage"]
)
def test_invalid_model_imports_are_422(api: Api, case: str) -> None:
    w = _small_weights()
    nan = dict(w)
    first = next(iter(nan))
    nan[first] = np.full_like(nan[first], np.nan)
    bodies = {
        "no_architecture": codec.encode(w),
        "unknown_architecture": codec.encode(w, metadata={"architecture": "resnet"}),
        "wrong_shapes": codec.encode(
            _small_weights(64), metadata={"architecture": "small", "embedding_dim": "128"}
        ),
        "nan": codec.encode(nan, metadata={"architecture": "small"}),
        "garbage": b"not a model at all",
    }
    r = unchanged(api, lambda: api.c.post("/v1/models", content=bodies[case], headers=ADMIN_H))
    assert r.status_code == 422, r.text


# --- server-side evaluation of every model version ------------------------------------------------


def test_unknown_eval_set_is_422(api: Api) -> None:
    r = unchanged(api, lambda: api.c.post("/v1/tasks", json=task_body(eval_set="lfw"), headers=ADMIN_H))
    assert r.status_code == 422 and r.json()["code"] == "unknown_eval_set"


def test_each_version_is_evaluated_on_the_eval_set(tmp_path: Path) -> None:
    from facefl.data import write_image_folder

    eval_dir = write_image_folder(tmp_path / "heldout", identities=range(500, 510), images_per_identity=4)
    settings = make_settings(tmp_path, eval_sets={"heldout": eval_dir})
    with TestClient(create_app(settings)) as client:
        api = Api(client)
        t = api.task(eval_set="heldout", policy={"target_reports": 1, "min_reports": 1})
        assert t["eval_set"] == "heldout"

        def evaluated(version: int) -> bool:
            r = api.c.get(f"/v1/models/{version}/info", headers=ADMIN_H)
            return r.status_code == 200 and "eval" in r.json()["metrics"]

        wait_for(lambda: evaluated(1), timeout=60)
        dev = api.device()
        a = api.assignment(dev)
        assert api.upload(dev, a, api.delta_bytes(a)).status_code == 202
        wait_for(lambda: evaluated(2), timeout=60)
        report = api.c.get("/v1/models/2/info", headers=ADMIN_H).json()["metrics"]["eval"]
        assert report["set"] == "heldout" and report["pairs"] > 0
        assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["auc"] <= 1.0


def test_every_registered_architecture_can_be_a_task_and_a_simulation() -> None:
    """The API's architecture enum and the simulator's --model choices follow facefl.models' registry
    (dlib-resnet was registered but refused by both)."""
    import argparse
    import typing

    from facefl.models import ARCHITECTURES
    from server_api.schemas import Architecture
    from simulator.cli import add_arguments

    assert set(typing.get_args(Architecture)) == set(ARCHITECTURES)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    model = next(a for a in parser._actions if a.dest == "model")
    assert set(model.choices or ()) == set(ARCHITECTURES)
