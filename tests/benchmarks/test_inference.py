"""benchmarks/inference.py end to end with tiny counts: a small checkpoint, generated LFW-layout pairs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from facefl.data.lfw import write_synthetic_lfw
from tests.export.helpers import write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_measures_every_runtime(tmp_path: Path) -> None:
    lfw = write_synthetic_lfw(tmp_path / "lfw", pairs_per_fold=3, identities_per_fold=2, extra_identities=2)
    ckpt = write_checkpoint(tmp_path / "small.safetensors", dim=128)
    out = tmp_path / "inference.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/inference.py", "--quick", "--models", "small",
         "--checkpoint", f"small={ckpt}", "--lfw", str(lfw), "--calibration", str(tmp_path / "none"),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| small | ORT int8 |" in proc.stdout and "target >= 3x" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["latency_ms"]) == {"torch", "ort_fp32", "ort_int8"}
    assert all(v["b1"] > 0 and v["b32"] > 0 for v in row["latency_ms"].values())
    assert row["size_bytes"]["ort_int8"] < row["size_bytes"]["ort_fp32"]
    assert row["parity"]["ort_fp32"]["min_cosine"] >= 0.9999
    assert set(row["accuracy"]) == {"torch", "ort_fp32", "ort_int8", "set"}
    assert row["accuracy"]["set"].startswith("lfw folds [6, 7, 8, 9, 10]")


@pytest.mark.slow  # exports and quantizes the 22 MB network: minutes on a shared 2-core machine
def test_dlib_resnet_rows_have_dlib_itself_as_the_anchor(tmp_path: Path) -> None:
    from facefl.importers.cli import import_dlib_resnet

    lfw = write_synthetic_lfw(tmp_path / "lfw", pairs_per_fold=2, identities_per_fold=2, extra_identities=2)
    ckpt = import_dlib_resnet(tmp_path / "dlib.safetensors")
    out = tmp_path / "inference.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/inference.py", "--quick", "--models", "dlib-resnet", "--dlib-accuracy",
         "--checkpoint", f"dlib-resnet={ckpt}", "--lfw", str(lfw), "--calibration", str(tmp_path / "none"),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| dlib-resnet | dlib (anchor) |" in proc.stdout and "faster than dlib at batch 1" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["latency_ms"]) == {"torch", "ort_fp32", "ort_int8", "dlib"}
    assert row["parity"]["dlib"]["min_cosine"] >= 0.999  # the imported network is dlib's
    assert set(row["accuracy"]) == {"torch", "ort_fp32", "ort_int8", "dlib", "set"}
    assert set(row["cpu_per_wall"]) == {"torch", "ort_fp32", "ort_int8", "dlib"}
