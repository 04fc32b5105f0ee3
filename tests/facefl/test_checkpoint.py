"""Model checkpoints (one safetensors file + metadata) and resumable training state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from facefl.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    build_from_checkpoint,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
    training_state_path,
)
from facefl.codec import decode
from facefl.data import Preprocessing
from facefl.models import build_backbone, state_to_numpy

torch.set_num_threads(1)


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every float tensor (BatchNorm statistics included) so a round trip is a real test."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=gen)).abs_()
    return model


def test_round_trip(tmp_path: Path) -> None:
    model = _trained_looking(build_backbone("small", 32, seed=1))
    path = save_checkpoint(
        tmp_path / "m.safetensors", model, "small", metrics={"accuracy": 0.81, "pairs": 3000.0}
    )
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # umask, not 0600
    ckpt = load_checkpoint(path)
    assert (ckpt.architecture, ckpt.embedding_dim, ckpt.image_size) == ("small", 32, 64)
    assert ckpt.metadata["format"] == CHECKPOINT_FORMAT
    assert ckpt.metrics == {"accuracy": 0.81, "pairs": 3000.0}
    assert ckpt.preprocessing == Preprocessing(64)
    expected = state_to_numpy(model)
    assert ckpt.tensors.keys() == expected.keys()
    for name, arr in expected.items():
        np.testing.assert_array_equal(ckpt.tensors[name], arr)
    # the same bytes are a valid wire payload: the server can take the file as a model version
    assert decode(path.read_bytes()).keys() == expected.keys()

    rebuilt = build_from_checkpoint(path)
    assert not rebuilt.training
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)


def test_save_from_tensor_dict_and_validation(tmp_path: Path) -> None:
    model = build_backbone("small", 16, seed=0)
    tensors = state_to_numpy(model)
    with pytest.raises(ValueError, match="embedding_dim is required"):
        save_checkpoint(tmp_path / "a.safetensors", tensors, "small")
    path = save_checkpoint(tmp_path / "a.safetensors", tensors, "small", 16)
    assert load_checkpoint(path).embedding_dim == 16
    with pytest.raises(ValueError, match="do not fit"):
        save_checkpoint(tmp_path / "b.safetensors", tensors, "small", 32)
    with pytest.raises(ValueError, match="unknown architecture"):
        save_checkpoint(tmp_path / "b.safetensors", tensors, "resnet", 16)
    assert not (tmp_path / "b.safetensors").exists()


def _raw(path: Path, metadata: dict[str, str]) -> Path:
    tensors = state_to_numpy(build_backbone("small", 8, seed=0))
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 this is a zip, maybe a pickle" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="without a 'format'"):
        load_checkpoint(_raw(tmp_path / "plain.safetensors", {}))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(_raw(tmp_path / "other.safetensors", {"format": "facefl-backbone/99"}))
    base = {"format": CHECKPOINT_FORMAT, "embedding_dim": "8", "image_size": "64"}
    with pytest.raises(CheckpointError, match="no 'architecture'"):
        load_checkpoint(_raw(tmp_path / "noarch.safetensors", base))
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet'"):
        load_checkpoint(_raw(tmp_path / "arch.safetensors", {**base, "architecture": "resnet"}))
    with pytest.raises(CheckpointError, match="image_size 112 does not match"):
        load_checkpoint(
            _raw(tmp_path / "size.safetensors", {**base, "architecture": "small", "image_size": "112"})
        )
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(
            _raw(tmp_path / "json.safetensors", {**base, "architecture": "small", "metrics": "{"})
        )
    wrong_dim = _raw(tmp_path / "dim.safetensors", {**base, "architecture": "small", "embedding_dim": "9"})
    assert load_checkpoint(wrong_dim).embedding_dim == 9
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_from_checkpoint(wrong_dim)


def test_training_state(tmp_path: Path) -> None:
    assert training_state_path("out/model.safetensors") == Path("out/model.state.safetensors")
    assert training_state_path("out/model.bin") == Path("out/model.bin.state.safetensors")
    path = training_state_path(tmp_path / "m.safetensors")
    tensors = {"head.weight": torch.ones(3, 2), "steps": np.array([7], dtype=np.int64)}
    meta = {"epoch": 2, "step": 14, "config": {"lr": 0.1, "folds": [6, 7]}, "history": [{"loss": 1.5}]}
    save_training_state(path, tensors, meta)
    state = load_training_state(path)
    assert state.metadata == meta
    np.testing.assert_array_equal(state.tensors["head.weight"], np.ones((3, 2), np.float32))
    assert state.tensors["steps"].dtype == np.int64
    with pytest.raises(ValueError, match="reserved"):
        save_training_state(path, tensors, {"format": "x"})
    model_file = save_checkpoint(tmp_path / "m.safetensors", build_backbone("small", 8), "small")
    with pytest.raises(CheckpointError, match="not a facefl training state"):
        load_training_state(model_file)
    with safe_open(str(model_file), framework="numpy") as f:  # plain safetensors, readable by anyone
        raw = f.metadata()
    assert raw["format"] == CHECKPOINT_FORMAT and json.loads(raw["preprocessing"])["image_size"] == 64
