"""benchmarks/inference.py end to end with tiny counts: a small checkpoint, generated LFW-layout pairs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
