"""FedFR and FedFace through a real uvicorn server and the device SDK.

The privacy test records every byte a FedFR device sends (an httpx transport wrapping the real one):
no local image, no embedding of a local image, no local-classifier or DFC weight may appear in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open

from device_sdk import (
    AdminClient,
    FederatedClient,
    InvalidRequest,
    LocalDataset,
    NotFound,
    TaskInfo,
    Trainer,
    load_personalized_model,
    run_round,
)
from facefl.algorithms.fedface import CLASS_EMBEDDING_KEY
from facefl.algorithms.fedfr import PUBLIC_HEAD_KEY
from facefl.data import write_image_folder
from facefl.models import backbone_state
from tests.conftest import ADMIN, SECRET, LiveServer

pytestmark = pytest.mark.slow


class RecordingTransport(httpx.BaseTransport):
    """Passes requests to the real transport and keeps every byte the device sends."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent = bytearray()
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.paths.append(f"{request.method} {request.url.path}")
        self.sent += request.method.encode() + b" " + bytes(request.url.raw_path)
        for name, value in request.headers.raw:
            self.sent += name + b": " + value + b"\n"
        self.sent += body
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def _admin(server: LiveServer) -> AdminClient:
    return AdminClient(server.base_url, ADMIN, timeout=60)


def _register(server: LiveServer, transport: httpx.BaseTransport | None = None) -> FederatedClient:
    client = FederatedClient(server.base_url, transport=transport, cache_dir=None)
    client.register(SECRET)
    return client


@pytest.fixture
def public_dir(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "public", range(500, 530), 3, image_size=64, seed=5)


def _fedfr_task(admin: AdminClient, **hp: object) -> TaskInfo:
    return admin.create_task(
        "fedfr",
        algorithm="fedfr",
        rounds=2,
        hyperparams={"public_set": "pub", "lr": 0.01, "batch_size": 16, "max_hard_negatives": 16, **hp},
        policy={"target_reports": 1, "min_reports": 1, "round_timeout_s": 120},
    )


def test_fedfr_task_validation(tmp_path: Path, public_dir: Path) -> None:
    server = LiveServer(tmp_path / "srv", FACEFL_PUBLIC_SETS=json.dumps({"pub": str(public_dir)})).start()
    try:
        with _admin(server) as admin:
            before = admin.list_tasks()
            cases: list[tuple[dict[str, Any], str]] = [
                ({"algorithm": "fedfr"}, "public_set"),
                ({"algorithm": "fedfr", "hyperparams": {"public_set": "nope"}}, "unknown_public_set"),
                ({"algorithm": "fedavg", "hyperparams": {"public_set": "pub"}}, "fedfr only"),
                (
                    {"algorithm": "fedfr", "hyperparams": {"public_set": "pub", "dfc_weight": -1}},
                    "dfc_weight",
                ),
            ]
            for extra, needle in cases:
                with pytest.raises(InvalidRequest) as refused:
                    admin.create_task("x", **extra)
                assert refused.value.status_code == 422, refused.value
                assert needle in str(refused.value)  # the server's detail and code
            assert admin.list_tasks() == before  # refused requests created nothing
            task = _fedfr_task(admin)
            assert task.current_version is not None
            info = admin.model_info(task.current_version)
            weights = admin.download_model(task.current_version)
            # the global model = backbone + one public-classifier row per public identity (unit rows)
            assert weights[PUBLIC_HEAD_KEY].shape == (30, info.embedding_dim)
            assert np.allclose(np.linalg.norm(weights[PUBLIC_HEAD_KEY], axis=1), 1.0, atol=1e-5)
            # the wire: the pack is revalidated by its ETag (what the device's cache relies on)
            pack_url = f"{server.base_url}/v1/tasks/{task.id}/public-pack"
            headers = {"Authorization": f"Bearer {ADMIN}"}
            pack = httpx.get(pack_url, headers=headers, timeout=60)
            assert pack.status_code == 200
            again = httpx.get(
                pack_url, headers={**headers, "If-None-Match": pack.headers["ETag"]}, timeout=60
            )
            assert again.status_code == 304
            bank = admin.download_public_bank(task.current_version)
            assert bank["embeddings"].shape == (90, info.embedding_dim) and bank["labels"].shape == (90,)
            fedavg = admin.create_task("plain")
            assert fedavg.current_version is not None
            with pytest.raises(NotFound):
                admin.download_public_bank(fedavg.current_version)
            with pytest.raises(NotFound):
                admin.download_public_pack(fedavg.id)
    finally:
        server.stop()


def test_fedfr_round_sends_nothing_private(tmp_path: Path, public_dir: Path) -> None:
    server = LiveServer(tmp_path / "srv", FACEFL_PUBLIC_SETS=json.dumps({"pub": str(public_dir)})).start()
    try:
        with _admin(server) as admin:
            task = _fedfr_task(admin, hard_negative_threshold=-1.0)  # every public image qualifies
        dataset = LocalDataset.synthetic([1, 2, 3], 6, 64, seed=1)
        state = tmp_path / "device-state"
        recorder = RecordingTransport()
        trainer = Trainer(num_threads=1)
        with _register(server, recorder) as client:
            for _ in range(2):  # the second round adds the contrastive term (previous local model)
                report = run_round(client, trainer, dataset, state, task_id=task.id, seed=0)
                assert report.metrics["hard_negatives"] == 16.0
            assert report.metrics["contrastive_loss"] > 0.0
            base = client.download_model(report.assignment.base_version)
        sent = bytes(recorder.sent)
        assert any(p.startswith("POST /v1/rounds/") for p in recorder.paths)

        # what leaves the device: the backbone + public-classifier delta, exactly those names
        with _admin(server) as admin:
            rounds = admin.task_rounds(task.id)
            assert [r.status for r in rounds] == ["aggregated", "aggregated"]
        assert b"converter" not in sent and b"local_head" not in sent and b"identities" not in sent

        def leaks(array: np.ndarray, what: str) -> None:
            flat = np.ascontiguousarray(array, np.float32).reshape(len(array), -1)
            for row in flat:
                window = row[:4].tobytes()  # 16 bytes: no accidental match in megabytes of floats
                assert sent.find(window) < 0, f"{what} found in the bytes the device sent"

        # local images: raw pixels, and the float tensors the model consumes
        pixels = dataset.images.reshape(len(dataset), -1)
        for row in pixels:
            assert sent.find(row[1000:1032].tobytes()) < 0, "a local image's pixels were sent"
        from facefl.data import preprocessing_for

        leaks(preprocessing_for("small").batch(dataset.images)[:, :, 20, 20:24], "a preprocessed local image")
        # embeddings of local images, under the received model and under the device's personalized model
        received = trainer.embed(backbone_state(base), dataset.images, architecture="small")
        leaks(received, "an embedding of a local image")
        personal = load_personalized_model(state)
        with torch.no_grad():
            x = torch.from_numpy(preprocessing_for("small").batch(dataset.images))
            leaks(personal(x).numpy(), "a personalized embedding of a local image")
        # the local classifier and the DFC module (after the last round: what the device holds)
        with safe_open(str(state / "local_head.safetensors"), framework="numpy") as fh:
            leaks(fh.get_tensor("weight"), "a local-classifier row")
        with safe_open(str(state / "dfc.safetensors"), framework="numpy") as fh:
            leaks(fh.get_tensor("weight"), "a DFC classifier row")
            converter = fh.get_tensor("converter.weight")
            assert not np.allclose(converter, np.eye(len(converter))), "DFC should have trained"
            leaks(converter, "a DFC converter row")
    finally:
        server.stop()


def test_fedface_rounds_spread_class_embeddings(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "srv").start()
    try:
        with _admin(server) as admin:
            task = admin.create_task(
                "fedface",
                algorithm="fedface",
                rounds=2,
                hyperparams={"lr": 0.01, "batch_size": 8, "spreadout_steps": 20},
                policy={"target_reports": 3, "min_reports": 3, "round_timeout_s": 120},
            )
        clients = [_register(server) for _ in range(3)]
        trainer = Trainer(num_threads=1)
        sent_w: dict[str, np.ndarray] = {}
        try:
            for round_no in range(2):
                for i, client in enumerate(clients):
                    dataset = LocalDataset.synthetic([10 + i], 6, 64, seed=2)
                    assignment = client.wait_for_assignment(task.id, timeout_s=60)
                    base = client.download_model(assignment.base_version)
                    received = client.download_class_embedding(assignment.base_version)
                    if round_no == 0:
                        assert received is None  # before its first report the server has no row for it
                    else:
                        # the device gets back its own row, moved by the server's spreadout
                        assert received is not None and received.shape == sent_w[client.device_id].shape
                        assert not np.allclose(received, sent_w[client.device_id])
                    from device_sdk import RoundInputs

                    result = trainer.train(
                        assignment, base, dataset, None, seed=0, inputs=RoundInputs(class_embedding=received)
                    )
                    sent_w[str(client.device_id)] = result.delta[CLASS_EMBEDDING_KEY]
                    client.upload_update(assignment, result.delta, result.num_samples, result.metrics)
                with _admin(server) as admin:
                    assert admin.wait_for_round(assignment.round_id, timeout_s=30).status == "aggregated"
            with _admin(server) as admin:
                assert admin.get_task(task.id).status == "completed"
        finally:
            for c in clients:
                c.close()
    finally:
        server.stop()


def test_fedface_update_must_carry_a_normalized_class_embedding(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "srv").start()
    try:
        with _admin(server) as admin:
            task = admin.create_task(
                "ff", algorithm="fedface", policy={"target_reports": 1, "min_reports": 1}
            )
        with _register(server) as client:
            assignment = client.wait_for_assignment(task.id, timeout_s=30)
            base = client.download_model(assignment.base_version)
            zero = {k: np.zeros_like(v) for k, v in base.items()}
            from device_sdk import UpdateRejected

            with pytest.raises(UpdateRejected, match=r"fedface\.class_embedding"):
                client.upload_update(assignment, zero, 4, {})
            with pytest.raises(UpdateRejected, match="L2-normalized"):
                client.upload_update(
                    assignment, {**zero, CLASS_EMBEDDING_KEY: np.full(128, 2.0, np.float32)}, 4, {}
                )
            with _admin(server) as admin:
                assert admin.get_round(assignment.round_id).reported == 0  # refused uploads changed nothing
            w = np.zeros(128, np.float32)
            w[0] = 1.0
            client.upload_update(assignment, {**zero, CLASS_EMBEDDING_KEY: w}, 4, {})
    finally:
        server.stop()
