"""facefl.device_state: the device's state folder, read leniently for training and strictly for export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facefl.device_state import DFC_FILE, HEAD_FILE, PERSONALIZED_FILE, DeviceState, DeviceStateError
from facefl.models import build_backbone, state_to_numpy

D = 8


def _dfc(n: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "converter.weight": np.eye(D, dtype=np.float32) * scale,
        "converter.bias": np.full(D, 0.5, np.float32),
        "weight": np.arange(n * D, dtype=np.float32).reshape(n, D),
        "bias": np.arange(n, dtype=np.float32),
    }


def test_head_round_trip_by_identity_name(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "s")
    assert state.load_head("small", D) == {}  # nothing stored yet: a fresh head
    rows = torch.arange(2 * D, dtype=torch.float32).reshape(2, D)
    state.save_head(rows, ("bob", "ann"), "small")
    assert (tmp_path / "s" / HEAD_FILE).is_file()
    stored = state.load_head("small", D)
    assert stored.keys() == {"bob", "ann"}
    np.testing.assert_array_equal(stored["ann"], np.arange(D, 2 * D, dtype=np.float32))
    assert state.load_head("tiny", D) == {}  # another architecture's head is not reused
    assert state.load_head("small", D + 1) == {}  # nor one of another embedding size


def test_unreadable_training_state_means_start_fresh(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    for name in (HEAD_FILE, DFC_FILE, PERSONALIZED_FILE):
        (tmp_path / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert state.load_head("small", D) == {}
    assert state.load_dfc("small", D) is None
    assert state.load_previous_backbone("small", D) is None


def test_dfc_round_trip_and_shape_checks(tmp_path: Path) -> None:
    state = DeviceState(tmp_path)
    assert state.load_dfc("small", D) is None
    state.save_dfc({k: torch.from_numpy(v) for k, v in _dfc(3, 2.0).items()}, ("a", "b", "c"), "small")
    stored = state.load_dfc("small", D)
    assert stored is not None and stored.identities == ("a", "b", "c")
    np.testing.assert_array_equal(stored.tensors["converter.weight"], np.eye(D) * 2.0)
    assert state.load_dfc("tiny", D) is None
    assert state.load_dfc("small", D * 2) is None  # the converter does not fit this embedding size
    state.save_dfc(_dfc(3), ("a", "b"), "small")  # three classifier rows for two names: not trusted
    assert state.load_dfc("small", D) is None
    converter = state.dfc_converter(D)  # the export side reads the converter only
    assert torch.equal(converter.weight, torch.eye(D)) and torch.equal(converter.bias, torch.full((D,), 0.5))


def test_personalized_model_is_backbone_then_converter_then_unit_norm(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "s")
    with pytest.raises(DeviceStateError, match="does not exist"):
        state.personalized_model()
    backbone = build_backbone("small", D, seed=1).eval()
    state.save_personalized(state_to_numpy(backbone), "small", D)
    with pytest.raises(DeviceStateError, match=r"DFC file .* does not exist"):
        state.personalized_model()
    assert state.load_previous_backbone("small", D) is not None
    assert state.load_previous_backbone("small", D * 2) is None
    state.save_dfc(_dfc(2, scale=-1.0), ("a", "b"), "small")
    model = state.personalized_model()
    assert model.architecture == "small" and model.embedding_dim == D and len(model.sha256) == 64
    x = torch.rand(3, 3, model.preprocessing.image_size, model.preprocessing.image_size)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(-backbone(x) + 0.5, dim=1)
        got = model.module(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-5)
    before = model.sha256
    state.save_dfc(_dfc(2, scale=1.0), ("a", "b"), "small")
    assert state.personalized_model().sha256 != before  # the digest names exactly this state
