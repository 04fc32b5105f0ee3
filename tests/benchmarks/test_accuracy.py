"""The accuracy benchmark's whole pipeline (pretrain, local-only, federated rows through a real server) on
generated faces with the smoke profile. Numbers are not asserted: only that every row is measured, and
that FedFR's personalized row comes from the devices' own models. Three federated rows cover the
benchmark's distinct paths (a plain task, FedFace's one identity per device, FedFR's personalized models);
FedProx and FedFR's ablations are the same paths with other hyper-parameters, and each costs a simulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from facefl.data import write_image_folder
from facefl.data.lfw import write_synthetic_lfw

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_smoke_profile_on_generated_faces(tmp_path: Path) -> None:
    lfw = write_synthetic_lfw(tmp_path / "lfw", pairs_per_fold=3, identities_per_fold=2, extra_identities=6)
    devices = write_image_folder(tmp_path / "devices", range(100, 120), 6, image_size=64)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/accuracy.py", "--profile", "smoke", "--lfw", str(lfw),
         "--devices-data", str(devices), "--out", str(out), "--methods", "FedAvg,FedFace,FedFR"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["pretrained only", "local-only", "FedAvg", "FedFace", "FedFR", "FedFR, global model only"]
    for name in names:
        assert f"| {name} |" in proc.stdout
    report = json.loads((out / "accuracy.json").read_text())
    assert [r["name"] for r in report["rows"]] == names
    for row in report["rows"]:
        assert 0.0 <= row["generic"]["accuracy"] <= 1.0
        assert 0.0 <= row["personalized"]["dir@far=1e-2"] <= 1.0
    for name in [n for n in names[2:] if n != "FedFR, global model only"]:
        assert [c["round"] for c in report["rounds"][name]] == [0, 1, 2]
        assert all(c["status"] == "aggregated" for c in report["rounds"][name][1:])
    assert report["rounds"]["FedFR"][-1]["personalized_model"] == "device backbone + DFC converter"
    fedfr_rows = {r["name"]: r for r in report["rows"] if r["name"].startswith("FedFR")}
    # the same global model, evaluated without and with the devices' personalization
    assert fedfr_rows["FedFR"]["generic"] == fedfr_rows["FedFR, global model only"]["generic"]
    assert "personalized_model" not in report["rounds"]["FedAvg"][-1]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
