"""End to end on a real uvicorn server: a partial-training task with a release gate. A hostile (but valid)
update is held back, a real SDK device then trains on the served version, and `facefl export --server
--task` exports what the task serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_sdk import AdminClient, FederatedClient, LocalDataset, RoundInfo, Trainer, run_round
from facefl import codec
from facefl.checkpoint import load_checkpoint
from facefl.cli import main
from facefl.data import write_image_folder
from facefl.models import resolve_trainable, trainable_names
from tests.conftest import ADMIN, SECRET, LiveServer

pytestmark = pytest.mark.slow


def _wait_aggregated(admin: AdminClient, round_id: int) -> RoundInfo:
    info = admin.wait_for_round(round_id, timeout_s=180)
    assert info.status == "aggregated", f"round {round_id} did not aggregate: {info}"
    return info


def _run(tmp_path: Path, url: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    eval_dir = write_image_folder(tmp_path / "heldout", range(500, 520), images_per_identity=6, image_size=64)
    server = LiveServer(
        tmp_path / "srv", url, FACEFL_EVAL_SETS=json.dumps({"heldout": str(eval_dir)})
    ).start()
    try:
        with AdminClient(server.base_url, ADMIN, timeout=60) as admin:
            task_id = admin.create_task(
                "gated",
                rounds=2,
                trainable=["embedding"],
                eval_set="heldout",
                hyperparams={"local_epochs": 1, "batch_size": 8, "lr": 1e-4, "momentum": 0.0},
                # a seed-0 model scores AUC ~0.66 on this set, the constant-embedding model below 0.5
                policy={"target_reports": 1, "min_reports": 1, "gate": {"metric": "auc", "max_drop": 0.1}},
            ).id
            prefixes = resolve_trainable("small", ["embedding"])

            # round 1: a device uploads a hostile but valid update of the trainable tensors: every face
            # gets the same embedding. It aggregates into version 2, which is recorded and held back
            with FederatedClient(server.base_url) as hostile:
                hostile.register(SECRET, name="hostile")
                a = hostile.wait_for_assignment(task_id, timeout_s=60)
                assert a.base_version == 1 and a.trainable_prefixes == prefixes
                base = hostile.download_model(a.base_version)
                names = trainable_names(base, prefixes)
                target = {k: np.zeros_like(base[k]) for k in names}
                target["bn.bias"] = np.ones_like(base["bn.bias"])
                target["bn.running_var"] = np.ones_like(base["bn.running_var"])
                hostile.upload_update(a, codec.delta(target, {k: base[k] for k in names}), num_samples=10)
            first = _wait_aggregated(admin, a.round_id)
            assert first.result_version == 2 and first.served_version == 1
            held = admin.model_info(2)
            assert held.served is False and held.held_back_reason
            assert admin.get_task(task_id).current_version == 1

            # round 2: a real device checks in, gets the served version as its base, trains the
            # embedding group only and uploads its deltas
            with FederatedClient(server.base_url, cache_dir=tmp_path / "cache") as device:
                device.register(SECRET, name="phone")
                data = LocalDataset.synthetic([11, 12, 13], images_per_identity=6, image_size=64, seed=0)
                report = run_round(
                    device, Trainer(device="cpu", num_threads=1), data, tmp_path / "state", task_id, seed=0
                )
            assert report.assignment.base_version == 1  # the served version, not the held-back one
            full = sum(v.nbytes for v in base.values())
            assert report.receipt.bytes_sent < full / 2  # the embedding group only
            second = _wait_aggregated(admin, report.assignment.round_id)
            assert second.base_version == 1
            assert second.result_version == 3 and second.served_version == 3
            served = admin.model_info(3)
            assert served.served is True and served.parent_version == 1
            assert admin.get_task(task_id).current_version == 3
            new = admin.download_model(3)
            frozen = [k for k in base if k not in set(names)]
            assert frozen and all(np.array_equal(new[k], base[k]) for k in frozen)

        # export: the task's served version; the held-back one is refused
        out = tmp_path / "served.onnx"
        capsys.readouterr()
        argv = ["export", "--server", server.base_url, "--token", ADMIN, "--out", str(out)]
        assert main([*argv, "--task", str(task_id)]) == 0
        assert "task 1 serves model version 3" in capsys.readouterr().out
        exported = load_checkpoint(out.with_name("served.v3.safetensors")).tensors
        assert all(np.array_equal(exported[k], new[k]) for k in exported)
        assert main([*argv, "--version", "2"]) == 1
        assert "held back" in capsys.readouterr().err
    finally:
        server.stop()


def test_gate_and_partial_training_end_to_end_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, None, capsys)


@pytest.mark.postgres
def test_gate_and_partial_training_end_to_end_postgres(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path, pg_url, capsys)
