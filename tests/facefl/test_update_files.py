"""facefl.update_files: the weighted mean of stored updates (memory-mapped, any encoding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facefl import codec, compression
from facefl.update_files import UpdateFile, mean_of_files, read_tensors


def _write(tmp_path: Path, name: str, tensors: dict[str, np.ndarray], encoding: str = "float32") -> Path:
    path = tmp_path / name
    path.write_bytes(compression.encode_payload(tensors, encoding))
    return path


def test_weighted_mean_by_hand(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", {"w": np.array([[1.0, 2.0]], np.float32), "b": np.array([1.0], np.float32)})
    b = _write(tmp_path, "b", {"w": np.array([[3.0, 4.0]], np.float32), "b": np.array([5.0], np.float32)})
    mean = mean_of_files([a, b], [1.0, 3.0])
    np.testing.assert_allclose(mean["w"], [[2.5, 3.5]], rtol=1e-7)  # (1 + 9) / 4, (2 + 12) / 4
    np.testing.assert_allclose(mean["b"], [4.0], rtol=1e-7)  # (1 + 15) / 4
    assert mean["w"].dtype == np.float32
    # a factor per update (clipping): sum w f x / sum w
    clipped = mean_of_files([a, b], [1.0, 3.0], factors=[1.0, 0.5])
    np.testing.assert_allclose(clipped["w"], [[(1 + 4.5) / 4, (2 + 6) / 4]], rtol=1e-7)
    assert set(mean_of_files([a, b], [1.0, 1.0], exclude={"b"})) == {"w"}


def test_mixed_encodings_average_their_decoded_values(tmp_path: Path) -> None:
    w = np.array([[1.27, -0.5], [0.25, 1.0]], np.float32)
    paths = [_write(tmp_path, e, {"w": w}, e) for e in compression.ENCODINGS]
    decoded = [compression.decode_payload(p.read_bytes())["w"] for p in paths]
    expected = sum(d.astype(np.float64) * k for d, k in zip(decoded, (1, 2, 3, 4), strict=True)) / 10
    np.testing.assert_allclose(mean_of_files(paths, [1.0, 2.0, 3.0, 4.0])["w"], expected, rtol=1e-6)


@pytest.mark.parametrize("encoding", compression.ENCODINGS)
def test_tensors_larger_than_a_block_and_long_channels(tmp_path: Path, encoding: str) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "big": rng.standard_normal((3, 70_001)).astype(np.float32),  # a channel longer than a block
        "many": rng.standard_normal((300, 333)).astype(np.float32),  # channels across block edges
        "bias": rng.standard_normal(7).astype(np.float32),
    }
    paths = [
        _write(tmp_path, f"u{i}", {k: v * (i + 1) for k, v in tensors.items()}, encoding) for i in range(3)
    ]
    weights = [2.0, 1.0, 5.0]
    decoded = [compression.decode_payload(p.read_bytes()) for p in paths]
    mean = mean_of_files(paths, weights)
    for name in tensors:
        expected = sum(d[name].astype(np.float64) * w for d, w in zip(decoded, weights, strict=True)) / 8
        np.testing.assert_allclose(mean[name], expected, rtol=1e-5, atol=1e-6)


def test_a_float32_overflow_is_redone_in_float64(tmp_path: Path) -> None:
    """Every update at float32's largest value: with these weights the float32 coefficients round up
    enough that their float32 sum overflows; the mean is then redone in float64, finite."""
    top = np.finfo(np.float32).max
    weights = [1.0] * 8 + [30.0]
    with np.errstate(over="ignore"):  # the premise: float32 accumulation alone overflows
        acc = np.float32(0)
        for w in weights:
            acc = np.float32(acc + np.float32(top) * np.float32(w / sum(weights)))
    assert not np.isfinite(acc)
    paths = [_write(tmp_path, f"u{i}", {"w": np.full((1, 4), top, np.float32)}) for i in range(len(weights))]
    with np.errstate(over="ignore"):
        mean = mean_of_files(paths, weights)
    assert np.isfinite(mean["w"]).all()
    np.testing.assert_allclose(mean["w"], top, rtol=1e-6)


def test_files_that_do_not_match_are_refused(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", {"w": np.zeros((2, 2), np.float32)})
    other_name = _write(tmp_path, "b", {"v": np.zeros((2, 2), np.float32)})
    other_shape = _write(tmp_path, "c", {"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="names differ"):
        mean_of_files([a, other_name], [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        mean_of_files([a, other_shape], [1.0, 1.0])
    for weights in ([0.0, 1.0], [float("nan"), 1.0], [1.0]):
        with pytest.raises(ValueError, match="weight"):
            mean_of_files([a, a], weights)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "a", {"w": np.ones((4, 4), np.float32)})
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(codec.CodecError, match="length"):
        UpdateFile(path)


def test_read_tensors_decodes_the_named_ones(tmp_path: Path) -> None:
    w = np.array([[1.0, -2.0]], np.float32)
    path = _write(tmp_path, "a", {"w": w, "e": np.array([0.6, 0.8], np.float32)}, "int8")
    got = read_tensors(path, {"e", "absent"})
    assert set(got) == {"e"}
    np.testing.assert_array_equal(got["e"], np.array([0.6, 0.8], np.float32))
    with UpdateFile(path) as update:
        assert update.names == ["e", "w"]
        np.testing.assert_allclose(update.read("w"), w, atol=2 / 127)
