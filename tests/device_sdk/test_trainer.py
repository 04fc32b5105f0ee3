"""Trainer: local CosFace training on generated faces, the persisted local head, FedProx, deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device_sdk import LocalDataset, RoundInputs, Trainer, load_personalized_model
from device_sdk.trainer import HEAD_FILE
from facefl import codec
from facefl.data import preprocessing_for
from facefl.models import build_backbone, resolve_trainable, state_to_numpy, trainable_names


@dataclass(frozen=True)
class Job:
    architecture: str = "small"
    embedding_dim: int | None = 32
    algorithm: str = "fedavg"
    hyperparams: dict[str, Any] = field(
        default_factory=lambda: {"local_epochs": 1, "batch_size": 8, "lr": 0.05, "momentum": 0.9}
    )
    trainable_prefixes: tuple[str, ...] | None = None


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
    with pytest.raises(ValueError, match="fedavg, fedprox, fedfr and fedface"):
        trainer.train(Job(algorithm="scaffold"), base, data)
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


# ------------------------------------------------------------------------------------ FedFR, FedFace


def _fedfr_inputs(base: dict[str, np.ndarray], trainer: Trainer) -> tuple[dict[str, np.ndarray], RoundInputs]:
    from facefl.algorithms.fedfr import PUBLIC_HEAD_KEY
    from facefl.data.public import PublicSet

    images = np.concatenate([LocalDataset.synthetic([40 + i], 3, 64, seed=1).images for i in range(6)])
    public = PublicSet(images, np.repeat(np.arange(6), 3), [f"p{i}" for i in range(6)])
    bank = trainer.embed(base, images, architecture="small", embedding_dim=32)
    rng = np.random.default_rng(0)
    head = rng.normal(size=(6, 32)).astype(np.float32)
    head /= np.linalg.norm(head, axis=1, keepdims=True)
    return {**base, PUBLIC_HEAD_KEY: head}, RoundInputs(public=public, bank_embeddings=bank)


# every public image is a hard negative candidate (threshold -1), at most 4 per round
FEDFR_HP = {
    "local_epochs": 1,
    "batch_size": 8,
    "lr": 0.05,
    "max_hard_negatives": 4,
    "hard_negative_threshold": -1,
}


def test_fedfr_round_updates_only_selected_public_rows_and_keeps_state(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset, tmp_path: Path
) -> None:
    from device_sdk.trainer import DFC_FILE, PERSONALIZED_FILE
    from facefl.algorithms.fedfr import PUBLIC_HEAD_KEY

    weights, inputs = _fedfr_inputs(base, trainer)
    hp = dict(FEDFR_HP)
    job = Job(algorithm="fedfr", hyperparams=hp)
    first = trainer.train(job, weights, data, tmp_path, seed=0, inputs=inputs)
    assert set(first.delta) == set(weights)  # backbone + public classifier, nothing else
    assert first.num_samples == len(data)  # weighted by the device's own images only
    assert first.metrics["hard_negatives"] == 4.0 and first.metrics["contrastive_loss"] == 0.0
    # the public classifier learns (hard negatives are its positives; local images push every row away)
    assert np.abs(first.delta[PUBLIC_HEAD_KEY]).sum() > 0 and np.isfinite(first.delta[PUBLIC_HEAD_KEY]).all()
    assert (tmp_path / PERSONALIZED_FILE).is_file() and (tmp_path / DFC_FILE).is_file()
    second = trainer.train(job, weights, data, tmp_path, seed=1, inputs=inputs)
    assert second.metrics["contrastive_loss"] > 0.0  # the previous local model now exists
    model = load_personalized_model(tmp_path)
    x = torch.from_numpy(preprocessing_for("small").batch(data.images[:3]))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 32) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_fedfr_needs_its_inputs(trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset) -> None:
    weights, inputs = _fedfr_inputs(base, trainer)
    job = Job(algorithm="fedfr")
    with pytest.raises(ValueError, match="public pack"):
        trainer.train(job, weights, data, None, seed=0)
    with pytest.raises(ValueError, match="public_head"):
        trainer.train(job, base, data, None, seed=0, inputs=inputs)


def test_fedface_round(trainer: Trainer, base: dict[str, np.ndarray]) -> None:
    from facefl.algorithms.fedface import CLASS_EMBEDDING_KEY

    one = LocalDataset.synthetic([21], images_per_identity=8, image_size=64, seed=0)
    job = Job(algorithm="fedface", hyperparams={"local_epochs": 3, "batch_size": 4, "lr": 0.05})
    result = trainer.train(job, base, one, None, seed=0)
    w = result.delta[CLASS_EMBEDDING_KEY]  # first round: the mean embedding under the received model
    mean = trainer.embed(base, one.images, architecture="small", embedding_dim=32).mean(0)
    assert np.allclose(w, mean / np.linalg.norm(mean), atol=1e-5)
    # later rounds: the server's (spread-out) row is used as is, and training pulls the faces toward it
    given = np.random.default_rng(0).normal(size=32).astype(np.float32)
    given /= np.linalg.norm(given)
    result = trainer.train(job, base, one, None, seed=0, inputs=RoundInputs(class_embedding=given))
    assert np.allclose(result.delta[CLASS_EMBEDDING_KEY], given)
    assert result.metrics["loss_after"] < 0.5 * result.metrics["loss_before"]
    with pytest.raises(ValueError, match="one identity per device"):
        trainer.train(job, base, LocalDataset.synthetic([1, 2], 4, 64), None, seed=0)


# ------------------------------------------------------------------------------------ partial training

LAST = resolve_trainable("small", ["last_block", "embedding"])


def _trained_names(base: dict[str, np.ndarray]) -> list[str]:
    return trainable_names(base, LAST)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_partial_training_uploads_the_trainable_tensors_only(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset, algorithm: str
) -> None:
    hp = {"local_epochs": 2, "batch_size": 8, "lr": 0.05, "mu": 0.01}
    result = trainer.train(Job(algorithm=algorithm, hyperparams=hp, trainable_prefixes=LAST), base, data)
    names = _trained_names(base)
    assert 0 < len(names) < len(base) and list(result.delta) == names
    assert all(n.startswith(("features.5.", "features.6.", "gdconv.", "embedding.", "bn.")) for n in names)
    # every trainable parameter moved, and so did the trainable BatchNorm layers' running statistics
    assert all(np.abs(result.delta[n]).sum() > 0 for n in names if not n.endswith("act.weight"))
    assert np.abs(result.delta["features.5.bn.running_mean"]).sum() > 0
    assert result.metrics["delta_norm"] == pytest.approx(codec.global_norm(result.delta))


def test_frozen_layers_keep_weights_and_batchnorm_statistics(base: dict[str, np.ndarray]) -> None:
    """One training step with the freezing the trainer applies: frozen parameters get no gradient and
    frozen BatchNorm layers neither use nor update batch statistics; trainable ones do both."""
    from device_sdk.trainer import _freeze_outside, _train_mode

    model = build_backbone("small", embedding_dim=32, seed=3)
    trained = _freeze_outside(model, base, LAST)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _train_mode(model, trained)
    assert not model.features[0].bn.training and model.features[5].bn.training and model.bn.training
    model(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))).sum().backward()
    optimizer.step()
    after = state_to_numpy(model)
    for name, value in base.items():
        changed = not np.array_equal(after[name], value)
        if name in trained:
            assert changed or name.endswith("act.weight"), name
        else:
            assert not changed, name


def test_fedfr_partial_keeps_the_public_classifier_and_frozen_backbone(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset, tmp_path: Path
) -> None:
    from device_sdk.trainer import PERSONALIZED_FILE
    from facefl.algorithms.fedfr import PUBLIC_HEAD_KEY
    from facefl.checkpoint import load_checkpoint

    weights, inputs = _fedfr_inputs(base, trainer)
    hp = dict(FEDFR_HP)
    job = Job(algorithm="fedfr", hyperparams=hp, trainable_prefixes=LAST)
    result = trainer.train(job, weights, data, tmp_path, seed=0, inputs=inputs)
    assert list(result.delta) == [*_trained_names(base), PUBLIC_HEAD_KEY]
    assert np.abs(result.delta[PUBLIC_HEAD_KEY]).sum() > 0
    local = load_checkpoint(tmp_path / PERSONALIZED_FILE).tensors  # the device's whole local backbone
    frozen = [n for n in base if n not in result.delta]
    assert frozen and all(np.array_equal(local[n], base[n]) for n in frozen)


def test_fedface_partial_uploads_trainable_tensors_and_the_class_embedding(
    trainer: Trainer, base: dict[str, np.ndarray]
) -> None:
    from facefl.algorithms.fedface import CLASS_EMBEDDING_KEY

    one = LocalDataset.synthetic([21], images_per_identity=8, image_size=64, seed=0)
    hp = {"local_epochs": 1, "batch_size": 4, "lr": 0.05}
    result = trainer.train(Job(algorithm="fedface", hyperparams=hp, trainable_prefixes=LAST), base, one, None)
    assert list(result.delta) == [*_trained_names(base), CLASS_EMBEDDING_KEY]


def test_prefixes_that_select_nothing_are_refused(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset
) -> None:
    with pytest.raises(ValueError, match="select no parameter"):
        trainer.train(Job(trainable_prefixes=("nothing.",)), base, data)


def test_pair_margin_loss_trains_the_embedding_without_the_head(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset, tmp_path: Path
) -> None:
    hp = {"local_epochs": 4, "batch_size": 16, "lr": 0.01, "loss": "pair_margin", "pair_threshold": 4.0}
    state = tmp_path / "device-state"
    result = trainer.train(Job(hyperparams=hp), base, data, state_dir=state, seed=0)
    assert result.metrics["train_loss"] < result.metrics["train_loss_first_epoch"]
    assert all(np.isfinite(v).all() for v in result.delta.values())
    assert codec.global_norm(result.delta) > 0
    cosface = trainer.train(Job(hyperparams={**hp, "loss": "cosface"}), base, data, seed=0)
    assert any(not np.allclose(cosface.delta[k], result.delta[k]) for k in result.delta)
    # the head is imprinted from the class means under the received model, and not trained by this loss
    fresh = tmp_path / "fresh-state"
    trainer.train(Job(hyperparams={**hp, "lr": 1e-12}), base, data, state_dir=fresh, seed=0)
    stored, imprinted = Trainer._read_head(state, "small", 32), Trainer._read_head(fresh, "small", 32)
    assert all(np.allclose(stored[k], imprinted[k], atol=1e-5) for k in stored)


def test_adam_optimizer_gives_another_finite_update(
    trainer: Trainer, base: dict[str, np.ndarray], data: LocalDataset
) -> None:
    hp = {"local_epochs": 1, "batch_size": 8, "lr": 1e-3}
    sgd = trainer.train(Job(hyperparams=hp), base, data, seed=4)
    adam = trainer.train(Job(hyperparams={**hp, "optimizer": "adam"}), base, data, seed=4)
    assert all(np.isfinite(v).all() for v in adam.delta.values())
    assert any(not np.allclose(sgd.delta[k], adam.delta[k]) for k in sgd.delta)
