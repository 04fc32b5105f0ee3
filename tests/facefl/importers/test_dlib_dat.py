"""dlib's serialization, read in NumPy, and ``facefl import-model``'s errors.

The encoding tests use hand-built bytes; the file tests use the .dat files of face_recognition_models (the
``pretrained`` extra, which CI installs).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from facefl.cli import main
from facefl.importers.dlib_dat import DatReader, DlibFormatError, find_model_file, read_face_resnet


def _int(value: int) -> bytes:
    """dlib's integer encoding, written independently of the reader for the tests."""
    magnitude = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(magnitude) | (0x80 if value < 0 else 0)]) + magnitude


@pytest.fixture(scope="module")
def model_file() -> Path:
    return find_model_file()


@pytest.fixture(scope="module")
def model_bytes(model_file: Path) -> bytes:
    return model_file.read_bytes()


def test_integers() -> None:
    cases = {
        b"\x01\x00": 0,
        b"\x01\x05": 5,
        b"\x81\x05": -5,
        b"\x02\x34\x12": 0x1234,
        b"\x82\x34\x12": -0x1234,
    }
    cases[b"\x08" + (2**63 - 1).to_bytes(8, "little")] = 2**63 - 1
    for raw, value in cases.items():
        reader = DatReader(raw)
        assert reader.read_int() == value and reader.at_end()
        assert _int(value) == raw
    for bad in (b"\x00", b"\x09" + bytes(9), b"\x31\x00"):  # no bytes, too many, stray control bits
        with pytest.raises(DlibFormatError, match="corrupt"):
            DatReader(bad).read_int()


def test_floats_are_mantissa_then_exponent() -> None:
    # 1.5 = 3 * 2**-1: were the exponent first, these bytes would read as -1 * 2**3 = -8
    assert DatReader(_int(3) + _int(-1)).read_float() == 1.5
    assert DatReader(_int(-3) + _int(-1)).read_float() == -1.5
    assert DatReader(_int(10737418) + _int(-28)).read_float() == pytest.approx(0.04)
    assert DatReader(_int(0) + _int(32000)).read_float() == np.inf
    assert np.isnan(DatReader(_int(0) + _int(32002)).read_float())


def test_strings_bools_and_tensors() -> None:
    reader = DatReader(_int(5) + b"con_6" + b"1" + b"0")
    assert reader.read_string() == "con_6" and reader.read_bool() is True and reader.read_bool() is False
    with pytest.raises(DlibFormatError, match="not a bool"):
        DatReader(b"x").read_bool()

    values = [1.5, -2.0, 3.0, 0.25, 7.0, -0.5]
    raw = _int(2) + b"".join(_int(d) for d in (1, 2, 1, 3)) + struct.pack("<6f", *values)  # raw LE float32
    tensor = DatReader(raw).read_tensor()
    assert tensor.shape == (1, 2, 1, 3) and tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor.reshape(-1), values)  # NCHW order
    with pytest.raises(DlibFormatError, match="version 3"):
        DatReader(_int(3) + raw[1:]).read_tensor()
    with pytest.raises(DlibFormatError, match="truncated"):
        DatReader(raw[:-2], "t.dat").read_tensor()


def test_the_file_starts_with_its_loss_layer(model_bytes: bytes) -> None:
    reader = DatReader(model_bytes)
    assert reader.read_int() == 1  # add_loss_layer's version
    assert reader.read_string() == "loss_metric_2"
    assert (reader.read_float(), reader.read_float()) == pytest.approx((0.04, 0.6))  # margin, threshold


def test_reads_the_whole_file(model_file: Path) -> None:
    tensors = read_face_resnet(model_file)
    assert tensors["stem.conv.weight"].shape == (32, 3, 7, 7)
    assert tensors["fc.weight"].shape == (128, 256)
    assert len(tensors) == 4 + 14 * 8 + 1  # stem conv + affine; 14 blocks of 2 convs + 2 affines; fc
    assert all(v.dtype == np.float32 for v in tensors.values())


def test_truncated_file_names_the_file(model_bytes: bytes, tmp_path: Path) -> None:
    for cut in (3, 200, len(model_bytes) // 2, len(model_bytes) - 1):
        path = tmp_path / f"cut{cut}.dat"
        path.write_bytes(model_bytes[:cut])
        with pytest.raises(DlibFormatError, match="truncated") as info:
            read_face_resnet(path)
        assert str(path) in str(info.value)


def test_corrupt_files_name_the_file(model_bytes: bytes, tmp_path: Path) -> None:
    start = model_bytes.index(b"input_rgb_image_sized")
    renamed = bytearray(model_bytes)
    renamed[start : start + 5] = b"INPUT"  # a layer type that is not the expected one
    trailing = model_bytes + b"\x00\x00"
    bad_version = bytearray(model_bytes)
    bad_version[0x22] = 7  # the version number of a layer near the top (a relu's)
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    for name, data, message in [
        ("renamed.dat", bytes(renamed), "expected the input layer"),
        ("trailing.dat", trailing, "bytes after the end"),
        ("version.dat", bytes(bad_version), "corrupt"),
        ("garbage.dat", garbage, "not a dlib network file"),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DlibFormatError, match=message) as info:
            read_face_resnet(path)
        assert str(path) in str(info.value)


def test_another_network_is_refused(model_file: Path, tmp_path: Path) -> None:
    detector = model_file.with_name("mmod_human_face_detector.dat")  # dlib's CNN face detector
    with pytest.raises(DlibFormatError, match=r"another network.*loss_mmod") as info:
        read_face_resnet(detector)
    assert str(detector) in str(info.value)
    landmarks = model_file.with_name("shape_predictor_5_face_landmarks.dat")  # not a dnn at all
    with pytest.raises(DlibFormatError, match="is not a dlib network file") as info:
        read_face_resnet(landmarks)
    assert str(info.value).count(str(landmarks)) == 1
    path = tmp_path / "other.dat"
    path.write_bytes(_int(1) + _int(12) + b"loss_multicl" + bytes(10))
    with pytest.raises(DlibFormatError, match="another network"):
        read_face_resnet(path)


def test_model_file_is_found_without_importing_the_package() -> None:
    import sys

    path = find_model_file()
    assert path.name == "dlib_face_recognition_resnet_model_v1.dat" and path.is_file()
    assert "face_recognition_models" not in sys.modules  # its __init__ needs pkg_resources


def _uninstall(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make face_recognition_models look absent to both ways find_model_file looks for it."""

    def no_distribution(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _uninstall(monkeypatch)
    with pytest.raises(DlibFormatError, match=r"face_recognition_models package is not installed.*--dat"):
        find_model_file()


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["import-model", "dlib-resnet", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from facefl.checkpoint import load_checkpoint

    code, out, _ = _cli(["--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 0 and "m.safetensors" in out
    assert load_checkpoint(tmp_path / "m.safetensors").architecture == "dlib-resnet"


def test_cli_errors_are_one_line_with_exit_code_2(
    model_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(model_bytes[:1000])
    out_file = tmp_path / "m.safetensors"
    for dat in (tmp_path / "absent.dat", truncated):
        code, _, err = _cli(["--out", str(out_file), "--dat", str(dat)], capsys)
        assert code == 2 and err.count("\n") == 1 and str(dat) in err and "Traceback" not in err
        assert err.startswith("facefl import-model: error: ")
    assert not out_file.exists()
    _uninstall(monkeypatch)
    code, _, err = _cli(["--out", str(out_file)], capsys)
    assert code == 2 and "not installed" in err and err.count("\n") == 1
