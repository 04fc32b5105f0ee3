"""The operating threshold and stranger bank an export stores: hand-computed operating points, the
public-split sample, and the command end to end (a three-person phone's Recognizer sets its threshold on
the bank, or falls back to the stored threshold without one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_sdk import Recognizer
from export.errors import ExportError
from export.threshold import operating_point, spread_sample
from facefl.cli import main
from facefl.data import LfwProtocol, write_image_folder, write_synthetic_lfw
from facefl.embedders import OnnxEmbedder
from facefl.stranger_bank import STRANGER_BANK_KEY, decode_stranger_bank
from tests.device_sdk.test_recognizer import faces
from tests.export.helpers import write_checkpoint


def test_spread_sample_takes_identities_round_robin_and_skips_singletons() -> None:
    labels = np.array([2, 2, 0, 1, 1, 1, 3])  # identities 0 and 3 have one image: no genuine pair
    assert spread_sample(labels, 5).tolist() == [0, 1, 3, 4, 5]
    assert spread_sample(labels, 3).tolist() == [0, 3, 4]  # identity 1's first two, then identity 2's first
    assert spread_sample(labels, 4).tolist() == [0, 1, 3, 4]  # a genuine pair from each before any third
    with pytest.raises(ValueError):
        spread_sample(labels, 0)


def test_operating_point_on_hand_computed_scores() -> None:
    # unit 2-d embeddings at known angles: 3 identities x 2 images
    angles = np.deg2rad([0, 10, 50, 60, 120, 125])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 1, 1, 2, 2])
    # 12 impostor pairs; the highest: (1,2) cos 40 = 0.766, (0,2) and (1,3) cos 50 = 0.643, ...
    point = operating_point(emb, labels, far=1 / 12)
    assert point.threshold == pytest.approx(np.cos(np.deg2rad(40)))  # accepts exactly one impostor pair
    assert (point.impostor_pairs, point.genuine_pairs, point.measured_far) == (12, 3, pytest.approx(1 / 12))
    assert point.tar == 1.0  # genuine cosines: cos 10, cos 10, cos 5, all above 0.766
    with pytest.raises(ExportError, match="too few"):
        operating_point(emb, labels, far=1e-3)
    with pytest.raises(ExportError, match="no genuine pairs"):
        operating_point(emb[[0, 2, 4]], labels[[0, 2, 4]], far=0.5)


@pytest.fixture(scope="module")
def lfw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_lfw(
        tmp_path_factory.mktemp("lfw"), identities_per_fold=3, images_per_identity=4, extra_identities=8
    )


def test_export_stores_the_public_operating_threshold_and_the_recognizer_uses_it(
    lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = write_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    calib = write_image_folder(tmp_path / "calib", range(4), 3, image_size=64)
    argv = ["export", "--model", str(ckpt), "--out", str(out), "--int8", "--calibration", str(calib),
            "--threshold-set", str(lfw), "--threshold-far", "0.01",
            "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    assert "operating threshold" in capsys.readouterr().out
    points = json.loads((tmp_path / "r.json").read_text())["operating_points"]
    assert set(points) == {str(tmp_path / "m.fp32.onnx"), str(out)}  # each model gets its own
    public = LfwProtocol.from_root(lfw).public_identities
    for path, point in points.items():
        assert point["identities"] <= len(public) and point["measured_far"] <= 0.01
        metadata = OnnxEmbedder(path).metadata
        assert float(metadata["facefl.default_threshold"]) == point["threshold"]
        # the bank is the threshold set itself, embedded by this very model
        bank = decode_stranger_bank(metadata[STRANGER_BANK_KEY])
        assert len(bank) == point["images"] == point["stranger_bank"]
    bank = decode_stranger_bank(OnnxEmbedder(out).metadata[STRANGER_BANK_KEY])
    enrolled = [faces(range(k, k + 1), 3, seed=4) for k in range(3)]
    embedder = OnnxEmbedder(out)
    templates = np.stack([embedder.embed(images).mean(axis=0) for images in enrolled])
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    best = (bank @ templates.T).max(axis=1)  # each stranger's score under identify
    far = 0.05
    assert len(bank) >= 1 / far
    # three enrolled people: the threshold is set on the bank's strangers against their templates
    with Recognizer(out, store=tmp_path / "g.db", target_far=far) as rec:
        for k, images in enumerate(enrolled):
            rec.enroll(f"p{k}", list(images))
        info = rec.threshold_info
        assert (info.source, info.strangers) == ("strangers", len(bank))
        # recomputed outside the Recognizer (no PNG round trip, another batch): compared with a tolerance
        # far above float noise, so no stranger sits on the boundary
        assert (best >= info.value + 1e-4).mean() <= far
        assert (best >= info.value - 1e-3 - 1e-4).mean() > far  # the tightest such threshold
    # 27 impostor pairs are too few for FAR 1e-3, and so are the bank's faces: the stored threshold
    with Recognizer(out, store=tmp_path / "g.db") as rec:
        info = rec.threshold_info
        assert info.source == "model default" and info.value == points[str(out)]["threshold"]
    # without the bank, the same phone calibrates on its own 27 impostor pairs (enough for FAR 0.05)
    with Recognizer(out, store=tmp_path / "g.db", target_far=far, stranger_bank=False) as rec:
        assert (rec.threshold_info.source, rec.threshold_info.impostor_pairs) == ("calibrated", 27)


def test_export_without_a_stranger_bank(lfw: Path, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--threshold-set", str(lfw),
                 "--threshold-far", "0.01", "--no-stranger-bank"]) == 0  # fmt: skip
    metadata = OnnxEmbedder(out).metadata
    assert "facefl.default_threshold" in metadata and STRANGER_BANK_KEY not in metadata


def test_export_threshold_usage_errors(lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(write_checkpoint(tmp_path / "m.safetensors"))
    out = str(tmp_path / "m.onnx")
    both = ["--threshold-set", str(lfw), "--default-threshold", "0.5"]
    assert main(["export", "--model", ckpt, "--out", out, *both]) == 2
    assert "not both" in capsys.readouterr().err
    far_one = ["--threshold-set", str(lfw), "--threshold-far", "1"]
    assert main(["export", "--model", ckpt, "--out", out, *far_one]) == 2
    assert "--threshold-far must be in (0, 1)" in capsys.readouterr().err
    assert main(["export", "--model", ckpt, "--out", out, "--no-stranger-bank"]) == 2
    assert "only used with --threshold-set" in capsys.readouterr().err
    # the synthetic public split has far fewer than the 1,000 impostor pairs FAR 1e-3 needs
    assert main(["export", "--model", ckpt, "--out", out, "--threshold-set", str(lfw),
                 "--threshold-images", "6"]) == 1  # fmt: skip
    assert "too few to set a threshold" in capsys.readouterr().err
