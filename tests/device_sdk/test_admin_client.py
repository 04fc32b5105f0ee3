"""AdminClient against a real server (uvicorn on 127.0.0.1, temporary SQLite): tasks, model versions,
waiting for rounds and evaluations, and the server's error statuses as the SDK's typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from device_sdk import (
    AdminClient,
    AuthError,
    FederatedClient,
    InvalidRequest,
    NotFound,
    TransportError,
    WaitTimeout,
)
from facefl import codec
from facefl.algorithms import registry
from facefl.data import write_image_folder
from tests.conftest import ADMIN, LiveServer

TINY_POLICY = {"target_reports": 1, "min_reports": 1, "over_selection": 1.0, "round_timeout_s": 600}


def _tiny_task(admin: AdminClient) -> int:
    return admin.create_task("admin-test", architecture="tiny", rounds=2, policy=TINY_POLICY).id


def test_create_task_then_read_it_back(live_server: tuple[str, str, str]) -> None:
    base_url, admin_token, _ = live_server
    with AdminClient(base_url, admin_token) as admin:
        task = admin.create_task(
            "typed",
            algorithm="fedprox",
            architecture="tiny",
            seed=3,
            rounds=4,
            hyperparams={"mu": 0.05, "lr": 0.02},
            policy={"target_reports": 2, "min_reports": 1},
        )
        assert task.name == "typed" and task.algorithm == "fedprox" and task.architecture == "tiny"
        assert task.rounds == 4 and task.status == "running" and task.current_version is not None
        assert task.hyperparams["mu"] == 0.05 and task.hyperparams["lr"] == 0.02
        assert task.policy["target_reports"] == 2
        assert admin.get_task(task.id) == task
        assert task.id in [t.id for t in admin.list_tasks()]
        rounds = admin.task_rounds(task.id)
        assert [r.status for r in rounds] == ["open"] and rounds[0].base_version == task.current_version
        assert task.current_round is not None and admin.get_round(rounds[0].id).id == task.current_round.id
        info = admin.model_info(task.current_version)
        assert info.task_id == task.id and info.parent_version is None and info.served
        assert info.architecture == "tiny" and len(info.sha256) == 64
        assert info.version in [m.version for m in admin.list_models(task_id=task.id)]


def test_hyperparams_may_be_the_algorithms_own_model(live_server: tuple[str, str, str]) -> None:
    base_url, admin_token, _ = live_server
    hp = registry.get("fedprox").hyperparams(mu=0.2, local_epochs=2)
    with AdminClient(base_url, admin_token) as admin:
        task = admin.create_task("model-hp", algorithm="fedprox", architecture="tiny", hyperparams=hp)
    assert task.hyperparams["mu"] == 0.2 and task.hyperparams["local_epochs"] == 2


def test_refusals_raise_typed_errors_with_the_servers_detail(
    live_server: tuple[str, str, str],
) -> None:
    base_url, admin_token, secret = live_server
    with AdminClient(base_url, admin_token) as admin:
        before = admin.list_tasks()
        with pytest.raises(InvalidRequest) as invalid:
            admin.create_task("bad", architecture="tiny", hyperparams={"lr": -1.0})
        assert invalid.value.status_code == 422 and "lr" in invalid.value.detail
        with pytest.raises(InvalidRequest) as unknown:
            admin.create_task("bad", algorithm="no-such-algorithm")
        assert unknown.value.status_code == 422 and "algorithm" in unknown.value.detail
        with pytest.raises(InvalidRequest) as bad_model:
            admin.import_model(b"not safetensors", architecture="tiny")
        assert bad_model.value.status_code == 422 and bad_model.value.code == "bad_model"
        assert admin.list_tasks() == before  # refused requests created nothing

        with pytest.raises(NotFound) as missing:
            admin.get_task(10**9)
        assert missing.value.status_code == 404 and "not found" in missing.value.detail
        with pytest.raises(NotFound):
            admin.model_info(10**9)
        with pytest.raises(NotFound):
            admin.get_round(10**9)

    with AdminClient(base_url, "not-the-admin-token") as stranger, pytest.raises(AuthError) as unauth:
        stranger.create_task("x")
    assert unauth.value.status_code == 401 and unauth.value.detail
    with FederatedClient(base_url) as device:  # a device's token is known to the server, not an admin's
        device.register(secret)
        assert device.token is not None
    with AdminClient(base_url, device.token) as impostor, pytest.raises(AuthError) as forbidden:
        impostor.create_task("x")
    assert forbidden.value.status_code == 403 and "admin" in forbidden.value.detail


def test_timeouts_are_finite_and_infinite_ones_refused() -> None:
    with AdminClient("http://admin.invalid", "t") as admin:
        timeout = admin.timeout
        assert None not in (timeout.connect, timeout.read, timeout.write, timeout.pool)
    with pytest.raises(ValueError, match="finite"):
        AdminClient("http://admin.invalid", "t", timeout=httpx.Timeout(None))
    with pytest.raises(ValueError, match="token"):
        AdminClient("http://admin.invalid", "")


def test_task_creation_is_not_resent_after_an_ambiguous_failure() -> None:
    """The server may have created the task before the connection broke: the POST is not repeated."""
    seen: list[httpx.Request] = []

    def broken(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.ReadTimeout("simulated", request=request)

    transport = httpx.MockTransport(broken)
    with AdminClient("http://admin.invalid", "t", transport=transport, sleep=lambda s: None) as admin:
        with pytest.raises(TransportError):
            admin.create_task("once")
        assert len(seen) == 1
        with pytest.raises(TransportError):
            admin.get_task(1)  # a read is retried
        assert len(seen) == 1 + 1 + admin._conn.max_retries


def test_import_model_then_start_a_task_from_it(live_server: tuple[str, str, str]) -> None:
    base_url, admin_token, _ = live_server
    with AdminClient(base_url, admin_token) as admin:
        source = admin.create_task("source", architecture="tiny", seed=7)
        assert source.current_version is not None
        body = admin.download_model_bytes(source.current_version)
        imported = admin.import_model(body, architecture="tiny")
        assert imported.task_id is None and imported.parent_version is None and imported.served
        assert imported.sha256 == admin.model_info(source.current_version).sha256  # the same tensors
        task = admin.create_task("from-import", architecture="tiny", initial_version=imported.version)
        assert task.current_version is not None
        start = admin.download_model(task.current_version)
        original = codec.decode(body)
        assert start.keys() == original.keys()
        assert all(np.array_equal(start[k], original[k]) for k in original)


def test_wait_for_round_returns_the_closed_round(live_server: tuple[str, str, str]) -> None:
    base_url, admin_token, secret = live_server
    with AdminClient(base_url, admin_token) as admin:
        task_id = _tiny_task(admin)
        task = admin.get_task(task_id)
        assert task.current_round is not None
        with pytest.raises(WaitTimeout, match="still open"):  # nobody reports yet
            admin.wait_for_round(task.current_round.id, timeout_s=0.3)
        with pytest.raises(WaitTimeout, match="no evaluation"):  # the task has no eval set
            admin.wait_for_evaluation(task.current_version or 0, timeout_s=0.3)

        with FederatedClient(base_url) as device:
            device.register(secret)
            assignment = device.wait_for_assignment(task_id, timeout_s=30)
            base = device.download_model(assignment.base_version)
            device.upload_update(assignment, {k: np.zeros_like(v) for k, v in base.items()}, 4)
        closed = admin.wait_for_round(assignment.round_id, timeout_s=60)
        assert closed.status == "aggregated" and closed.reported == 1 and closed.result_version is not None
        assert admin.model_info(closed.result_version).parent_version == assignment.base_version
        second = admin.wait_for_open_round(task_id, exclude={closed.id}, timeout_s=60)
        assert second is not None and second.number == 2 and second.base_version == closed.result_version


def test_wait_for_evaluation_returns_the_servers_report(tmp_path: Path) -> None:
    eval_dir = write_image_folder(tmp_path / "heldout", range(500, 510), images_per_identity=4, image_size=64)
    server = LiveServer(tmp_path / "srv", FACEFL_EVAL_SETS=json.dumps({"heldout": str(eval_dir)})).start()
    try:
        with AdminClient(server.base_url, ADMIN) as admin:
            task = admin.create_task("evaluated", eval_set="heldout", rounds=1)
            assert task.current_version is not None
            report = admin.wait_for_evaluation(task.current_version, timeout_s=120)
            assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["auc"] <= 1.0
            assert admin.model_info(task.current_version).evaluation == report
    finally:
        server.stop()
