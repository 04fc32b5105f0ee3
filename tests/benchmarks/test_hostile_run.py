"""The hostile run (benchmarks/hostile.py) in --quick mode: every phase runs and no answer is a 5xx.

Memory, descriptors and staging files are measured and reported, never asserted here; what is asserted
is what the server answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "hostile.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_hostile_run_has_no_5xx_and_ends_every_stalled_upload(tmp_path: Path) -> None:
    out = tmp_path / "hostile.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    phases = {row["phase"]: row for row in result["phases"]}
    assert list(phases) == [
        "json_oversized", "upload_oversized", "upload_garbage", "stalled", "crafted", "registration_flood"
    ]  # fmt: skip
    assert result["server_errors"] == 0 and result["health_after"] == 200
    assert phases["json_oversized"]["codes"] == {"413": 4}
    assert phases["upload_oversized"]["codes"] == {"413": 2}
    assert set(phases["upload_garbage"]["codes"]) <= {"409", "422"}
    assert phases["stalled"]["codes"] == {"408": phases["stalled"]["requests"]}
    assert phases["crafted"]["codes"] == {"422": phases["crafted"]["requests"]}
    assert set(phases["registration_flood"]["codes"]) == {"201", "429"}
    assert all(row["staged_after"] == 0 for row in result["phases"])
    assert "registration_flood" in proc.stdout and "5xx: 0" in proc.stdout
