"""Partial training (a task's ``trainable`` groups) and the release gate (``policy.gate``), through the ASGI
app on a real SQLite file and on PostgreSQL.

Refusals assert the status code AND that no row or blob changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from facefl import codec
from facefl.models import resolve_trainable, trainable_names
from server_api.app import create_app
from tests.conftest import make_settings
from tests.server_api.test_api import ADMIN_H, Api, unchanged, wait_for

EMBEDDING_ONLY = ["embedding"]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from facefl.data import write_image_folder

    # 20 identities x 6 images: 400 pairs. A seed-0 random `small` model scores AUC ~0.66 on them, a model
    # whose embedding is one constant vector exactly 0.5 (every pair ties): far apart on either side of
    # the gates below, so no test here hinges on evaluation noise
    return write_image_folder(
        tmp_path_factory.mktemp("heldout"), identities=range(500, 520), images_per_identity=6, image_size=64
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path: Path, eval_dir: Path) -> Iterator[Api]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    settings = make_settings(tmp_path, url, max_upload_bytes=4 * 1024 * 1024, eval_sets={"heldout": eval_dir})
    with TestClient(create_app(settings)) as client:
        yield Api(client)


ONE_REPORT = {"target_reports": 1, "min_reports": 1, "round_timeout_s": 600}


def _body(**overrides: Any) -> dict[str, Any]:
    return {"name": "t", "rounds": 5, "policy": dict(ONE_REPORT), **overrides}


def _create(api: Api, **overrides: Any) -> Any:
    return api.c.post("/v1/tasks", json=_body(**overrides), headers=ADMIN_H)


# --- partial training --------------------------------------------------------------------------------


def test_unknown_group_is_422_naming_it_and_the_known_ones(api: Api) -> None:
    r = unchanged(api, lambda: _create(api, trainable=["embedding", "stem"]))
    assert r.status_code == 422 and r.json()["code"] == "unknown_parameter_group"
    assert "'stem'" in r.json()["detail"] and "early, embedding, last_block" in r.json()["detail"]
    # tiny has its own groups: small's are unknown there
    r = unchanged(api, lambda: _create(api, architecture="tiny", trainable=["embedding"]))
    assert r.status_code == 422 and "bias, weight" in r.json()["detail"]
    assert unchanged(api, lambda: _create(api, trainable=[])).status_code == 422


def test_partial_task_takes_exactly_the_trainable_tensors(api: Api) -> None:
    task = _create(api, trainable=EMBEDDING_ONLY).json()
    assert task["trainable"] == EMBEDDING_ONLY
    assert api.c.get(f"/v1/tasks/{task['id']}", headers=ADMIN_H).json()["trainable"] == EMBEDDING_ONLY
    dev = api.device()
    a = api.assignment(dev)
    prefixes = resolve_trainable("small", EMBEDDING_ONLY)
    assert a["trainable"] == EMBEDDING_ONLY and tuple(a["trainable_prefixes"]) == prefixes
    base = api.weights(a["base_version"])
    names = trainable_names(base, prefixes)
    assert 0 < len(names) < len(base)

    full = codec.encode({k: np.full_like(v, 0.01) for k, v in base.items()})
    r = unchanged(api, lambda: api.upload(dev, a, full))
    assert r.status_code == 422 and r.json()["code"] == "bad_update" and "unexpected" in r.json()["detail"]
    wrong_shape = {k: np.zeros((3,), np.float32) if k == "bn.bias" else np.zeros_like(base[k]) for k in names}
    assert unchanged(api, lambda: api.upload(dev, a, codec.encode(wrong_shape))).status_code == 422
    missing = {k: np.zeros_like(base[k]) for k in names[1:]}
    assert unchanged(api, lambda: api.upload(dev, a, codec.encode(missing))).status_code == 422

    partial = {k: np.full_like(base[k], 0.01) for k in names}
    assert api.upload(dev, a, codec.encode(partial)).status_code == 202
    wait_for(
        lambda: api.c.get(f"/v1/rounds/{a['round_id']}", headers=ADMIN_H).json()["status"] == "aggregated"
    )
    rnd = api.c.get(f"/v1/rounds/{a['round_id']}", headers=ADMIN_H).json()
    new = api.weights(rnd["result_version"])
    assert rnd["served_version"] == rnd["result_version"]  # no gate: served
    assert set(new) == set(base)  # a full model
    for k in base:
        expected = base[k] + np.float32(0.01) if k in names else base[k]
        assert np.array_equal(new[k], expected), k  # frozen tensors keep the base version's values


# --- the release gate --------------------------------------------------------------------------------


def test_gate_is_validated(api: Api) -> None:
    gate = {"metric": "auc", "max_drop": 0.01}
    r = unchanged(api, lambda: _create(api, policy={**ONE_REPORT, "gate": gate}))
    assert r.status_code == 422 and "eval_set" in r.json()["detail"]
    r = unchanged(
        api, lambda: _create(api, eval_set="heldout", policy={**ONE_REPORT, "gate": {"metric": "lfw_acc"}})
    )
    assert r.status_code == 422 and "gate.metric" in r.json()["detail"] and "'auc'" in r.json()["detail"]
    for bad in ({"max_drop": -0.1}, {"max_drop": 2}, {"metric": "auc", "threshold": 1}):
        r = unchanged(api, lambda g=bad: _create(api, eval_set="heldout", policy={**ONE_REPORT, "gate": g}))
        assert r.status_code == 422, bad


def _constant_embedding_delta(base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A hostile but valid update (finite, right names and shapes): every weight to zero except the last
    BatchNorm's bias and variance, so that every face gets the same embedding."""
    target = {k: np.zeros_like(v) for k, v in base.items()}
    target["bn.bias"] = np.ones_like(base["bn.bias"])
    target["bn.running_var"] = np.ones_like(base["bn.running_var"])
    return codec.delta(target, base)


def _aggregated(api: Api, round_id: int) -> dict[str, Any]:
    def done() -> bool:
        return api.c.get(f"/v1/rounds/{round_id}", headers=ADMIN_H).json()["status"] == "aggregated"

    wait_for(done, timeout=120)
    out: dict[str, Any] = api.c.get(f"/v1/rounds/{round_id}", headers=ADMIN_H).json()
    return out


def test_gate_holds_back_a_worse_version_and_serves_a_passing_one(api: Api) -> None:
    task = _create(
        api, eval_set="heldout", policy={**ONE_REPORT, "gate": {"metric": "auc", "max_drop": 0.05}}
    )
    assert task.status_code == 201, task.text
    assert task.json()["policy"]["gate"] == {"metric": "auc", "max_drop": 0.05}
    dev = api.device()

    # round 1: the hostile update aggregates into version 2, which is recorded but held back
    a = api.assignment(dev)
    assert a["base_version"] == 1
    hostile = _constant_embedding_delta(api.weights(1))
    assert api.upload(dev, a, codec.encode(hostile)).status_code == 202
    rnd = _aggregated(api, a["round_id"])
    assert rnd["result_version"] == 2 and rnd["served_version"] == 1
    info = api.c.get("/v1/models/2/info", headers=ADMIN_H).json()
    assert info["served"] is False and "auc" in info["held_back_reason"]
    assert info["metrics"]["eval"]["auc"] == pytest.approx(0.5)  # its metrics are recorded
    gate = info["metrics"]["gate"]
    assert gate["passed"] is False and gate["served_version"] == 1 and gate["drop"] > 0.05
    assert api.c.get("/v1/models/1/info", headers=ADMIN_H).json()["served"] is True
    status = api.c.get(f"/v1/tasks/{task.json()['id']}", headers=ADMIN_H).json()
    assert status["current_version"] == 1 and status["aggregated_rounds"] == 1
    # devices get the served version: the next round's base, and the held-back weights are not theirs
    assert status["current_round"]["base_version"] == 1
    assert api.c.get("/v1/models/2", headers=dev).status_code == 404
    assert api.c.get("/v1/models/2", headers=ADMIN_H).status_code == 200  # the admin may inspect it
    a = api.assignment(dev)
    assert a["base_version"] == 1

    # round 2: an update that changes nothing passes (drop 0 <= 0.05) and is served
    zero = {k: np.zeros_like(v) for k, v in api.weights(1).items()}
    assert api.upload(dev, a, codec.encode(zero)).status_code == 202
    rnd = _aggregated(api, a["round_id"])
    assert rnd["result_version"] == 3 and rnd["served_version"] == 3
    info = api.c.get("/v1/models/3/info", headers=ADMIN_H).json()
    assert info["served"] is True and info["held_back_reason"] is None
    assert info["metrics"]["gate"]["passed"] is True and info["parent_version"] == 1
    status = api.c.get(f"/v1/tasks/{task.json()['id']}", headers=ADMIN_H).json()
    assert status["current_version"] == 3 and status["current_round"]["base_version"] == 3
    assert api.c.get("/v1/models/3", headers=dev).status_code == 200
    listed = api.c.get(f"/v1/models?task_id={task.json()['id']}", headers=dev).json()
    assert [(m["version"], m["served"]) for m in listed] == [(1, True), (2, False), (3, True)]


def test_openapi_shows_the_new_fields_as_always_present(api: Api) -> None:
    schemas = api.c.get("/openapi.json").json()["components"]["schemas"]
    assert {"served", "held_back_reason"} <= set(schemas["ModelVersionOut"]["required"])
    assert "served_version" in schemas["RoundOut"]["required"]
    assert "trainable" in schemas["TaskOut"]["required"]
    assert {"trainable", "trainable_prefixes"} <= set(schemas["AssignmentOut"]["required"])
    gate = schemas["ReleaseGate"]["properties"]
    assert set(gate["metric"]["enum"]) == {"accuracy", "auc", "tar@far=1e-2", "tar@far=1e-3"}


def test_gate_metrics_are_keys_of_the_evaluation_report() -> None:
    from typing import get_args

    from facefl.metrics import verification_report
    from server_api.task_schemas import GateMetric

    rng = np.random.default_rng(0)
    is_same = np.arange(40) % 2 == 0
    report = verification_report(rng.random(40) + is_same, is_same, np.arange(40) % 4)
    assert set(get_args(GateMetric)) <= set(report)


def _set_stored_auc(api: Api, version: int, auc: float) -> None:
    """Rewrite a version's stored evaluation report (what the gate reads as that version's score)."""
    from server_api.orm import ModelVersion

    with api.ctx.db.write() as s:
        mv = s.get(ModelVersion, version)
        assert mv is not None
        mv.metrics = {**mv.metrics, "eval": {**mv.metrics["eval"], "auc": auc}}


def test_gate_also_holds_against_the_first_version_so_small_drops_cannot_add_up(api: Api) -> None:
    task = _create(
        api, eval_set="heldout", policy={**ONE_REPORT, "gate": {"metric": "auc", "max_drop": 0.05}}
    )
    assert task.status_code == 201, task.text
    dev = api.device()
    zero = {k: np.zeros_like(v) for k, v in api.weights(1).items()}
    a = api.assignment(dev)
    assert api.upload(dev, a, codec.encode(zero)).status_code == 202
    assert _aggregated(api, a["round_id"])["served_version"] == 2  # drop 0: served
    auc = api.c.get("/v1/models/2/info", headers=ADMIN_H).json()["metrics"]["eval"]["auc"]
    # a history of drops each within max_drop: the task started at auc + 0.08, the served version scores
    # auc + 0.02; the next candidate (the same weights again) scores auc, 0.02 below the served version
    # but 0.08 below the first one
    _set_stored_auc(api, 1, auc + 0.08)
    _set_stored_auc(api, 2, auc + 0.02)
    a = api.assignment(dev)
    assert a["base_version"] == 2
    assert api.upload(dev, a, codec.encode(zero)).status_code == 202
    rnd = _aggregated(api, a["round_id"])
    assert rnd["result_version"] == 3 and rnd["served_version"] == 2
    info = api.c.get("/v1/models/3/info", headers=ADMIN_H).json()
    assert info["served"] is False and "the task's first version 1" in info["held_back_reason"]
    gate = info["metrics"]["gate"]
    assert gate["first_version"] == 1 and gate["served_version"] == 2
    assert gate["drop"] == pytest.approx(0.08, abs=1e-6)
