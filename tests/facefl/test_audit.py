"""Label-noise audit: hand-made embeddings with known answers, and `facefl audit-data` on generated faces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from facefl.audit import audit_identities, class_means, folder_purity, split_half_similarity
from facefl.checkpoint import save_checkpoint
from facefl.cli import main
from facefl.data import write_image_folder
from facefl.models import build_backbone

E = np.eye(8)


def test_split_half_similarity_and_purity_by_hand() -> None:
    # folder 0: [e0, e0, e1, e1] -> halves' means e0 and e1 -> cosine 0; mean (e0+e1)/sqrt2 -> purity 0.7071
    # folder 1: four copies of e2 -> 1.0 and 1.0; folder 2 has 3 images: below min_images, skipped
    emb = np.array([E[0], E[0], E[1], E[1], E[2], E[2], 3 * E[2], E[2], E[3], E[3], E[3]])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_allclose(split_half_similarity(emb, labels), [0.0, 1.0], atol=1e-12)
    purity = folder_purity(emb, labels)
    assert set(purity) == {0, 1}
    assert purity[0] == pytest.approx(2**-0.5) and purity[1] == pytest.approx(1.0)
    ids, means = class_means(emb, labels)
    assert ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(means[0], (E[0] + E[1]) / 2**0.5)


def _people(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Five clean people (e0..e4 plus noise of growing size), person a filed again, and a folder mixing
    two people who are in no other folder (e5 and e6, no noise)."""
    names = ["a", "b", "c", "d", "e", "a-again", "mixed"]
    emb, labels = [], []
    for k, scale in enumerate((0.05, 0.06, 0.07, 0.08, 0.09)):
        emb += [E[k] + scale * rng.standard_normal(8) for _ in range(6)]
        labels += [k] * 6
    emb += [E[0] + 0.05 * rng.standard_normal(8) for _ in range(6)]
    labels += [5] * 6
    emb += [E[5]] * 3 + [E[6]] * 3
    labels += [6] * 6
    return np.array(emb), np.array(labels), names


def test_audit_flags_the_person_filed_twice_and_the_mixed_folder() -> None:
    emb, labels, names = _people(np.random.default_rng(0))
    report = audit_identities(emb, labels, names, duplicate_threshold=0.9)
    assert [(a, b) for a, b, _ in report.duplicates] == [("a", "a-again")]
    assert report.duplicates[0][2] > 0.99
    assert [n for n, _, _ in report.mixed] == ["mixed"]
    assert report.mixed[0][1] == pytest.approx(2**-0.5) and report.mixed[0][2] < -3.5
    assert report.flagged() == ["a", "a-again", "mixed"]
    as_json = report.to_json()
    assert as_json["duplicates"][0]["a"] == "a" and as_json["mixed"][0]["folder"] == "mixed"


def test_default_threshold_comes_from_the_folders_halves() -> None:
    emb, labels, names = _people(np.random.default_rng(1))
    report = audit_identities(emb, labels, names)
    # the mixed folder's halves (e5 vs e6) have cosine 0: the 5th percentile sits between it and the
    # clean folders' halves, far above the cosine 0 of two different clean people
    halves = split_half_similarity(emb, labels)
    assert report.duplicate_threshold == pytest.approx(float(np.percentile(halves, 5)))
    assert 0.0 < report.duplicate_threshold < 0.99
    assert ("a", "a-again") in [(a, b) for a, b, _ in report.duplicates]
    assert not any({a, b} <= {"b", "c", "d", "e"} for a, b, _ in report.duplicates)


def test_audit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="must be"):
        audit_identities(np.ones((3, 4)), np.zeros(2, int), ["x"])
    with pytest.raises(ValueError, match="NaN"):
        audit_identities(np.full((2, 4), np.nan), np.zeros(2, int), ["x"])
    with pytest.raises(ValueError, match="at least two folders"):
        audit_identities(np.ones((4, 4)), np.zeros(4, int), ["x"])


def test_audit_data_command_flags_a_copied_folder(tmp_path: Path) -> None:
    faces = write_image_folder(tmp_path / "faces", range(8), 5, image_size=64)
    shutil.copytree(faces / "id_000001", faces / "id_000001-copy")  # one person filed twice
    ckpt = tmp_path / "small.safetensors"
    save_checkpoint(ckpt, build_backbone("small", seed=1), "small", 128)
    out, sheet = tmp_path / "audit.json", tmp_path / "sheet.png"
    argv = ["audit-data", str(faces), "--model", str(ckpt), "--json", str(out), "--sheet", str(sheet)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    pairs = [(d["a"], d["b"]) for d in report["duplicates"]]
    assert ("id_000001", "id_000001-copy") in pairs
    copy = next(d for d in report["duplicates"] if (d["a"], d["b"]) == ("id_000001", "id_000001-copy"))
    assert copy["cosine"] == pytest.approx(1.0, abs=1e-6)  # the same images embed the same
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["audit-data", str(tmp_path / "nowhere"), "--model", str(ckpt)]) == 1
    assert main(["audit-data", str(faces), "--model", str(tmp_path / "missing.safetensors")]) == 1
