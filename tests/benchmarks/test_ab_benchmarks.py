"""The A/B benchmarks (two server versions side by side) run end to end with tiny counts; speed is
measured, never asserted: these check that every variant was served, measured and written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, f"benchmarks/{script}", "--old-ref", "HEAD", "--rounds", "1", "--json", str(out)]
    proc = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert f"wrote {out}" in proc.stdout
    return result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_upload_ab_measures_both_servers_and_the_bare_endpoint(tmp_path: Path) -> None:
    result = _run("upload_ab.py", tmp_path / "u.json", "--uploads", "3", "--concurrency", "1")
    assert [row["server"] for row in result["table"]] == ["old", "new", "bare_fsync", "bare_no_fsync"]
    assert all(row["cpu_ms"] >= 0 and row["uploads_per_s"] > 0 for row in result["table"])
    assert result["meta"]["payload_bytes"] > 4_000_000  # mobilefacenet deltas
    assert all(result["meta"]["native_modules_loaded"][name]["httptools"] for name in ("old", "new", "bare"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkin_ab_measures_both_servers_and_both_bare_stacks(tmp_path: Path) -> None:
    result = _run("checkin_ab.py", tmp_path / "c.json", "--devices", "20", "--concurrency", "2")
    assert {(row["server"], row["phase"]) for row in result["table"]} == {
        (server, phase) for server in ("old", "new") for phase in ("checkin_new", "checkin_rotate")
    }
    assert all(row["cpu_ms"] >= 0 and row["req_per_s"] > 0 for row in result["table"])
    assert result["meta"]["native_modules_loaded"]["bare_old_stack"] == {"httptools": False, "uvloop": False}
