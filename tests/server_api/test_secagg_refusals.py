"""Secure aggregation's refusals through the app on a real SQLite file (PostgreSQL with
FACEFL_TEST_DATABASE_URL): a request in the wrong stage, a replay of different content, a share of the
wrong length, a device outside the cohort, bad keys, a masked upload of the wrong length. Each is a
clear 4xx that changes no row, flag, stage or blob. A resend of the same content (a device that lost
the answer) is answered as the first request was, and changes nothing either."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from facefl import codec
from facefl.secagg.client import SecAggClient
from facefl.secagg.roster import Advertisement, Roster
from server_api.app import create_app
from server_api.errors import ApiError
from server_api.orm import Round, SecAggMember, SecAggReveal, SecAggRound, SecAggShare
from server_api.services import secagg
from tests.conftest import SECRET, make_settings
from tests.server_api.test_api import ADMIN_H, Api, wait_for

POLICY = {
    "target_reports": 3,
    "min_reports": 2,
    "over_selection": 1.3,  # 4 assignments: the fourth device is left out of a cohort of 3
    "round_timeout_s": 600,
    "secure_aggregation": {"clip_norm": 5.0, "stage_timeout_s": 600},
}


class Dev:
    """A registered device with its assignment and its protocol state machine."""

    def __init__(self, api: Api) -> None:
        r = api.c.post("/v1/devices", json={"enrollment_secret": SECRET})
        assert r.status_code == 201, r.text
        self.api, self.id = api, r.json()["device_id"]
        self.auth = {"Authorization": f"Bearer {r.json()['token']}"}
        self.a = api.assignment(self.auth)
        self.h = {**self.auth, "X-Upload-Token": self.a["upload_token"]}
        self.machine = SecAggClient(self.id, self.a["round_id"])
        self.path = f"/v1/rounds/{self.a['round_id']}/secagg"
        self._keys: dict[str, str] | None = None

    def keys_body(self) -> dict[str, str]:
        if self._keys is None:  # the machine advertises once
            ad = self.machine.advertise()
            self._keys = {
                "c_public": base64.b64encode(ad.c_public).decode(),
                "s_public": base64.b64encode(ad.s_public).decode(),
            }
        return self._keys

    def post(self, what: str, **kw: Any) -> Any:
        return self.api.c.post(f"{self.path}/{what}", headers=self.h, **kw)

    def view(self) -> dict[str, Any]:
        r = self.api.c.get(self.path, headers=self.h)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def roster(self) -> Roster:
        v = self.view()
        ads = [
            Advertisement(m["device_id"], base64.b64decode(m["c_public"]), base64.b64decode(m["s_public"]))
            for m in v["roster"]
        ]
        return Roster.build(self.a["round_id"], ads, graph_seed=v["graph_seed"], max_degree=32)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    with TestClient(create_app(make_settings(tmp_path, url))) as client:
        yield Api(client)


def state(api: Api) -> dict[str, Any]:
    with api.ctx.db.read() as s:
        return {
            "members": [
                (m.device_id, m.shared, m.revealed)
                for m in s.scalars(select(SecAggMember).order_by(SecAggMember.device_id))
            ],
            "shares": s.scalar(select(func.count()).select_from(SecAggShare)),
            "reveals": s.scalar(select(func.count()).select_from(SecAggReveal)),
            "stages": [(r.round_id, r.stage, r.graph_seed) for r in s.scalars(select(SecAggRound))],
            "deadlines": [(r.id, r.deadline, r.max_assignments) for r in s.scalars(select(Round))],
            "plain": api.snapshot(),
        }


def refused(api: Api, status: int, code: str, action: Callable[[], Any]) -> None:
    before = state(api)
    r = action()
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text
    assert state(api) == before


def resent(api: Api, status: int, action: Callable[[], Any]) -> dict[str, Any]:
    """A resend of what the device already submitted: answered as the first time, nothing changes."""
    before = state(api)
    r = action()
    assert r.status_code == status, r.text
    assert state(api) == before
    return r.json()  # type: ignore[no-any-return]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cohort(api: Api) -> tuple[list[Dev], Dev]:
    api.task(rounds=1, architecture="tiny", policy=POLICY)
    devs = [Dev(api) for _ in range(4)]
    return devs[:3], devs[3]


def test_task_creation_refusals(api: Api) -> None:
    def create(**body: Any) -> Callable[[], Any]:
        return lambda: api.c.post(
            "/v1/tasks", json={"name": "t", "architecture": "tiny", **body}, headers=ADMIN_H
        )

    fedface = create(algorithm="fedface", policy=POLICY)
    before = state(api)
    r = fedface()
    assert r.status_code == 422 and "policy.secure_aggregation" in r.json()["detail"], r.text
    robust = create(policy={**POLICY, "robust": {"clip_norm": 1.0}})
    r = robust()
    assert r.status_code == 422 and "policy.robust" in r.json()["detail"], r.text
    for policy in (
        {**POLICY, "min_reports": 1},
        {**POLICY, "secure_aggregation": {}},
        {**POLICY, "secure_aggregation": {"clip_norm": 1.0, "max_neighbours": 49}},
        {**POLICY, "max_sample_weight": 10**9},
        {**POLICY, "update_encoding": "int8"},
        {**POLICY, "update_error_feedback": True},
    ):
        assert create(policy=policy)().status_code == 422
    assert state(api) == before
    for algorithm in ("fedavg", "fedprox", "fedadam"):
        hyperparams = {"mu": 0.1} if algorithm == "fedprox" else {}
        r = create(algorithm=algorithm, hyperparams=hyperparams, policy=POLICY)()
        assert r.status_code == 201, r.text
        assert r.json()["policy"]["secure_aggregation"]["clip_norm"] == 5.0


def test_stage_refusals_change_nothing(api: Api) -> None:
    cohort, late = _cohort(api)
    first = cohort[0]
    assert late.a["secure_aggregation"]["max_devices"] == 4

    # advertise stage: shares, uploads and reveals are out of order; keys must be usable and distinct
    refused(api, 409, "wrong_stage", lambda: first.post("shares", content=b"x" * 162))
    refused(api, 409, "wrong_stage", lambda: first.post("reveal", content=b""))
    refused(api, 409, "wrong_stage", lambda: first.post("masked-update", content=b"x"))
    keys = first.keys_body()
    zero = base64.b64encode(bytes(32)).decode()
    refused(api, 422, "bad_key", lambda: first.post("keys", json={**keys, "c_public": zero}))
    refused(api, 422, "bad_key", lambda: first.post("keys", json={**keys, "s_public": "!" * 44}))
    refused(api, 422, "bad_key", lambda: first.post("keys", json={**keys, "s_public": keys["c_public"]}))
    refused(
        api,
        403,
        "forbidden",
        lambda: api.c.post(f"{first.path}/keys", json=keys, headers={**first.h, "X-Upload-Token": "nope"}),
    )
    refused(
        api, 404, "not_found", lambda: api.c.post("/v1/rounds/999/secagg/keys", json=keys, headers=first.h)
    )
    plain = codec.encode({"fc.weight": np.zeros((20, 48), np.float32), "fc.bias": np.zeros(20, np.float32)})
    refused(api, 409, "secure_aggregation", lambda: api.upload(first.auth, first.a, plain))

    assert first.post("keys", json=keys).status_code == 200
    assert resent(api, 200, lambda: first.post("keys", json=keys)) == {
        "round_id": first.a["round_id"],
        "stage": "advertise",
    }
    other = SecAggClient(first.id, first.a["round_id"]).advertise()
    other_keys = {
        "c_public": base64.b64encode(other.c_public).decode(),
        "s_public": base64.b64encode(other.s_public).decode(),
    }
    refused(api, 409, "already_done", lambda: first.post("keys", json=other_keys))  # different keys
    raw = base64.b64decode(keys["c_public"]) + base64.b64decode(keys["s_public"])
    assert first.view()["submitted"] == {"keys": digest(raw)}
    stolen = {**cohort[1].keys_body(), "s_public": keys["s_public"]}
    refused(api, 422, "bad_key", lambda: cohort[1].post("keys", json=stolen))
    for d in cohort[1:]:
        r = d.post("keys", json=d.keys_body())
        assert r.status_code == 200, r.text
    assert r.json()["stage"] == "share"  # the third advertisement closed the stage: the cohort is fixed
    # its answer lost, the device that closed it sends its keys again: the stage has moved, it is in
    assert resent(api, 200, lambda: d.post("keys", json=d.keys_body()))["stage"] == "share"

    # share stage: the fourth device is outside the cohort and can no longer advertise or check in
    refused(api, 409, "wrong_stage", lambda: late.post("keys", json=late.keys_body()))
    refused(api, 403, "not_in_cohort", lambda: late.post("shares", content=b"x" * 324))
    roster = first.roster()
    outbox = first.machine.share(roster)
    body = b"".join(outbox[p] for p in roster.neighbours(first.id))
    refused(api, 422, "bad_shares", lambda: first.post("shares", content=body[:-1]))
    refused(api, 422, "bad_shares", lambda: first.post("shares", content=body + body[:162]))
    assert first.post("shares", content=body).status_code == 200
    assert resent(api, 200, lambda: first.post("shares", content=body))["stage"] == "share"
    tampered = body[:-1] + bytes([body[-1] ^ 1])
    refused(api, 409, "already_done", lambda: first.post("shares", content=tampered))
    assert first.view()["submitted"]["shares"] == digest(body)
    for d in cohort[1:]:
        out = d.machine.share(roster)
        assert d.post("shares", content=b"".join(out[p] for p in roster.neighbours(d.id))).status_code == 200

    # upload stage: a masked update of the wrong length or dtype is refused, no blob kept
    view = first.view()
    assert view["stage"] == "upload" and sorted(view["sharers"]) == sorted(d.id for d in cohort)
    length = view["vector_length"]
    assert length == 20 * 48 + 20 + 1
    inboxes = {d.id: {k: base64.b64decode(v) for k, v in d.view()["inbox"].items()} for d in cohort}
    masked = {d.id: d.machine.mask(inboxes[d.id], np.arange(length, dtype=np.uint32)) for d in cohort}
    short = codec.encode({"masked": masked[first.id][:-1]})
    refused(api, 422, "bad_update", lambda: first.post("masked-update", content=short))
    as_float = codec.encode({"masked": masked[first.id].astype(np.float32)})
    refused(api, 422, "bad_update", lambda: first.post("masked-update", content=as_float))
    refused(api, 403, "not_in_cohort", lambda: late.post("masked-update", content=short))
    refused(api, 409, "wrong_stage", lambda: first.post("reveal", content=b""))
    accepted = {}
    for d in cohort:
        r = d.post("masked-update", content=codec.encode({"masked": masked[d.id]}))
        assert r.status_code == 202, r.text
        accepted[d.id] = r.json()
    # the last upload closed the stage; a resend of the same body is answered from the record, another
    # body gets the refusal it always got
    mine = codec.encode({"masked": masked[first.id]})
    again = resent(api, 202, lambda: first.post("masked-update", content=mine))
    assert again["update_id"] == accepted[first.id]["update_id"] and again["reports"] == 3
    other_masked = codec.encode({"masked": masked[first.id] + np.uint32(1)})
    refused(api, 409, "wrong_stage", lambda: first.post("masked-update", content=other_masked))
    assert first.view()["submitted"]["masked-update"] == digest(mine)

    # unmask stage: a reveal of the wrong length, or from outside, is refused; a replay too
    view = first.view()
    assert view["stage"] == "unmask" and sorted(view["uploaders"]) == sorted(d.id for d in cohort)
    reveal = first.machine.unmask(set(), set(view["uploaders"]))
    shares = b"".join(reveal.self_seed_shares[o] for o in sorted(reveal.self_seed_shares))
    assert len(shares) == 2 * 66
    refused(api, 422, "bad_shares", lambda: first.post("reveal", content=shares[:-1]))
    refused(
        api, 422, "bad_shares", lambda: first.post("reveal", content=b"\xff" * len(shares))
    )  # outside the field
    refused(api, 403, "not_in_cohort", lambda: late.post("reveal", content=shares))
    assert first.post("reveal", content=shares).status_code == 200
    assert resent(api, 200, lambda: first.post("reveal", content=shares))["stage"] == "unmask"
    swapped = shares[66:] + shares[:66]
    refused(api, 409, "already_done", lambda: first.post("reveal", content=swapped))
    assert first.view()["submitted"] == {
        "keys": digest(raw),
        "shares": digest(body),
        "masked-update": digest(mine),
        "reveal": digest(shares),
    }


def _drive_to_upload(cohort: list[Dev]) -> None:
    """Every device of the cohort sends its keys, then its shares: the round waits for masked updates."""
    for d in cohort:
        assert d.post("keys", json=d.keys_body()).status_code == 200
    roster = cohort[0].roster()
    for d in cohort:
        out = d.machine.share(roster)
        assert d.post("shares", content=b"".join(out[p] for p in roster.neighbours(d.id))).status_code == 200


def _drive_to_unmask(api: Api, cohort: list[Dev]) -> dict[str, Any]:
    _drive_to_upload(cohort)
    for d in cohort:
        view = d.view()
        inbox = {k: base64.b64decode(v) for k, v in view["inbox"].items()}
        vector = np.zeros(view["vector_length"], np.uint32)
        vector[-1] = 1  # a zero update of weight 1
        r = d.post("masked-update", content=codec.encode({"masked": d.machine.mask(inbox, vector)}))
        assert r.status_code == 202, r.text
    return cohort[0].view()


def test_a_wrong_revealed_share_abandons_the_round_instead_of_a_garbage_model(api: Api) -> None:
    cohort, _ = _cohort(api)
    view = _drive_to_unmask(api, cohort)
    assert view["stage"] == "unmask"
    for i, d in enumerate(cohort):
        reveal = d.machine.unmask(set(), set(view["uploaders"]))
        shares = [reveal.self_seed_shares[o] for o in sorted(reveal.self_seed_shares)]
        if i == 0:  # a share that is a valid field element, but not the one this device was sent
            shares[0] = (int.from_bytes(shares[0], "big") + 1).to_bytes(66, "big")
        assert d.post("reveal", content=b"".join(shares)).status_code == 200

    def abandoned() -> bool:
        rnd = api.c.get(f"/v1/rounds/{view['round_id']}", headers=ADMIN_H).json()
        return rnd["status"] == "abandoned"  # type: ignore[no-any-return]

    wait_for(abandoned)
    rnd = api.c.get(f"/v1/rounds/{view['round_id']}", headers=ADMIN_H).json()
    assert "secure aggregation" in rnd["metrics"]["abandoned_reason"]
    assert api.c.get("/v1/tasks/1", headers=ADMIN_H).json()["current_version"] == 1  # no new version


def test_honest_reveals_aggregate_the_zero_updates(api: Api) -> None:
    cohort, _ = _cohort(api)
    view = _drive_to_unmask(api, cohort)
    for d in cohort:
        reveal = d.machine.unmask(set(), set(view["uploaders"]))
        shares = [reveal.self_seed_shares[o] for o in sorted(reveal.self_seed_shares)]
        assert d.post("reveal", content=b"".join(shares)).status_code == 200
    wait_for(lambda: api.c.get("/v1/tasks/1", headers=ADMIN_H).json()["status"] == "completed")
    rnd = api.c.get(f"/v1/rounds/{view['round_id']}", headers=ADMIN_H).json()
    assert rnd["status"] == "aggregated" and rnd["metrics"]["samples"] == 3  # three weights of 1
    base, new = api.weights(1), api.weights(2)
    assert all(np.array_equal(base[k], new[k]) for k in base)  # zero updates: the same model


def test_too_few_reveals_abandon_the_round_at_the_stage_deadline(api: Api) -> None:
    short = {**POLICY, "secure_aggregation": {"clip_norm": 5.0, "stage_timeout_s": 1.0}}
    api.task(rounds=1, architecture="tiny", policy=short)
    cohort = [Dev(api) for _ in range(3)]
    view = _drive_to_unmask(api, cohort)
    # one reveal of three: each self seed needs 2 of its 2 neighbours' shares, so none can be recovered
    reveal = cohort[0].machine.unmask(set(), set(view["uploaders"]))
    shares = [reveal.self_seed_shares[o] for o in sorted(reveal.self_seed_shares)]
    assert cohort[0].post("reveal", content=b"".join(shares)).status_code == 200

    def abandoned() -> bool:
        return api.c.get(f"/v1/rounds/{view['round_id']}", headers=ADMIN_H).json()["status"] == "abandoned"  # type: ignore[no-any-return]

    wait_for(abandoned)
    rnd = api.c.get(f"/v1/rounds/{view['round_id']}", headers=ADMIN_H).json()
    assert "too few shares revealed" in rnd["metrics"]["abandoned_reason"]
    task = api.c.get("/v1/tasks/1", headers=ADMIN_H).json()
    assert task["current_round"]["id"] != view["round_id"] and task["current_version"] == 1  # reopened


def test_a_resend_racing_its_first_masked_update_is_answered_from_the_record(api: Api) -> None:
    """Its preflight ran before the first upload was recorded (another worker, or just after the first
    released its claim): the write sees the record and answers from it; a different body is refused."""
    cohort, _ = _cohort(api)
    _drive_to_upload(cohort)
    first = cohort[0]
    view = first.view()
    inbox = {k: base64.b64decode(v) for k, v in view["inbox"].items()}
    vector = np.zeros(view["vector_length"], np.uint32)
    vector[-1] = 1
    masked = first.machine.mask(inbox, vector)
    body = codec.encode({"masked": masked})
    rid, token = first.a["round_id"], first.a["upload_token"]

    racing = [secagg.preflight_masked(api.ctx, rid, first.id, token) for _ in range(2)]
    assert all(t.recorded is None for t in racing)  # nothing recorded yet
    r = first.post("masked-update", content=body)
    assert r.status_code == 202, r.text

    before = state(api)
    staged = api.ctx.blobs.staging_file()
    staged.write_bytes(body)
    again = secagg.accept_masked(api.ctx, racing[0], staged)
    assert again.update_id == r.json()["update_id"] and again.reports == 1
    assert state(api) == before
    staged = api.ctx.blobs.staging_file()
    staged.write_bytes(codec.encode({"masked": masked + np.uint32(1)}))
    with pytest.raises(ApiError) as refusal:
        secagg.accept_masked(api.ctx, racing[1], staged)
    assert (refusal.value.status_code, refusal.value.code) == (409, "conflict")
    assert state(api) == before
