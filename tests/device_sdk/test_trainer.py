"""Trainer: local CosFace training on generated faces, the persisted local head, FedProx, deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device_sdk import LocalDataset, Trainer
from device_sdk.trainer import HEAD_FILE
from facefl import codec
from facefl.models import build_backbone, state_to_numpy


@dataclass(frozen=True)
class Job:
    architecture: str = "small"
    embedding_dim: int | None = 32
    algorithm: str = "fedavg"
    hyperparams: dict[str, Any] = field(
        default_factory=lambda: {"local_epochs": 1, "batch_size": 8, "lr": 0.05, "momentum": 0.9}
    )


@pytest.fixture(scope="module")
def base() -> dict[str, np.ndarray]:
    return state_to_numpy(build_backbone("small", embedding_dim=32, seed=3))


@pytest.fixture(scope="module")
def data() -> LocalDataset:
    return LocalDataset.synthetic([11, 12, 13, 14], images_per_identity=8, image_size=64, seed=0)


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    return Trainer(device="cpu")


def test_default_device_follows_cuda_availability() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Trainer().device.type == expected


def test_training_reduces_loss_and_delta_matches_base(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset
) -> None:
    job = Job(hyperparams={"local_epochs": 4, "batch_size": 8, "lr": 0.05})
    result = trainer.train(job, base, data, state_dir=None, seed=0)
    assert result.metrics["train_loss"] < 0.8 * result.metrics["train_loss_first_epoch"]
    assert result.num_samples == len(data) == 32
    assert result.metrics["steps"] == 16 and result.seconds > 0
    assert list(result.delta) == list(base)
    for name, arr in base.items():
        assert result.delta[name].shape == arr.shape and result.delta[name].dtype == np.float32
        assert np.isfinite(result.delta[name]).all()
    assert codec.global_norm(result.delta) > 0
    assert result.metrics["delta_norm"] == pytest.approx(codec.global_norm(result.delta))
    # the delta is exactly local - base: applying it to base gives a model that still loads
    local = codec.apply_delta(base, result.delta)
    model = build_backbone("small", embedding_dim=32)
    from facefl.models import load_numpy_state

    load_numpy_state(model, local)


def test_training_is_reproducible_with_a_seed(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset
) -> None:
    a = trainer.train(Job(), base, data, seed=5).delta
    b = trainer.train(Job(), base, data, seed=5).delta
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_local_head_is_persisted_and_reused(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset, tmp_path: Path
) -> None:
    state = tmp_path / "device-state"
    first = trainer.train(Job(), base, data, state_dir=state, seed=1)
    head_file = state / HEAD_FILE
    assert head_file.exists()
    stored = Trainer._read_head(state, "small", 32)
    assert set(stored) == set(data.identities)
    fresh = trainer.train(Job(), base, data, state_dir=None, seed=1)
    # a fresh head starts from the class means under the received model: same as round one's start
    assert fresh.metrics["loss_before"] == pytest.approx(first.metrics["loss_before"], rel=1e-5)
    # round two starts from the stored (trained) head, so its starting loss differs from a fresh head's
    second = trainer.train(Job(), base, data, state_dir=state, seed=1)
    assert second.metrics["loss_before"] != pytest.approx(fresh.metrics["loss_before"], rel=1e-3)
    restored = Trainer._read_head(state, "small", 32)
    assert any(not np.allclose(restored[k], stored[k]) for k in stored)  # and it keeps training

    # a newly enrolled person gets a new row; the known people keep theirs
    grown = LocalDataset.synthetic([11, 12, 13, 14, 15], images_per_identity=8, image_size=64, seed=0)
    trainer.train(Job(), base, grown, state_dir=state, seed=1)
    assert set(Trainer._read_head(state, "small", 32)) == set(grown.identities)


def test_fedprox_term_changes_the_update(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset
) -> None:
    hp = {"local_epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9}
    avg = trainer.train(Job(algorithm="fedavg", hyperparams=hp), base, data, seed=2)
    prox = trainer.train(Job(algorithm="fedprox", hyperparams={**hp, "mu": 5.0}), base, data, seed=2)
    assert any(not np.allclose(avg.delta[k], prox.delta[k]) for k in avg.delta)
    assert prox.metrics["prox_term_mean"] > 0
    # the proximal term pulls the local model toward the global one
    assert codec.global_norm(prox.delta) < codec.global_norm(avg.delta)


def test_embed_returns_unit_vectors(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset
) -> None:
    emb = trainer.embed(base, data.images[:5], architecture="small", embedding_dim=32)
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)


def test_bad_inputs_are_refused(trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset) -> None:
    with pytest.raises(ValueError, match="fedavg and fedprox"):
        trainer.train(Job(algorithm="fedfr"), base, data)
    with pytest.raises(ValueError, match="two images"):
        trainer.train(Job(), base, data.subset([0]))
    with pytest.raises(ValueError):
        trainer.train(Job(hyperparams={"lr": -1}), base, data)


def test_dataset_split_is_stratified(data: LocalDataset) -> None:
    train, test = data.train_test_split(0.25, seed=0)
    assert len(train) + len(test) == len(data)
    for label in range(data.num_identities):
        assert (train.labels == label).sum() == 6 and (test.labels == label).sum() == 2
    assert train.identities == data.identities


def test_dataset_from_folder(tmp_path: Path) -> None:
    from facefl.data.synthetic import write_image_folder

    root = write_image_folder(tmp_path / "faces", [1, 2], images_per_identity=3, image_size=80)
    ds = LocalDataset.from_folder(root, image_size=64)
    assert ds.images.shape == (6, 64, 64, 3) and ds.identities == ("id_000001", "id_000002")
    assert list(ds.labels) == [0, 0, 0, 1, 1, 1]
