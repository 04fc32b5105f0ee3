"""The simulator's command line: argument validation, and a small real run (server + worker processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target-reports", "5", "--devices", "2"], "--target-reports (5) cannot exceed --devices (2)"),
        (
            ["--devices", "4", "--target-reports", "2", "--min-reports", "3"],
            "--min-reports (3) cannot exceed",
        ),
        (["--algorithm", "fedprox", "--mu", "0"], "fedprox needs --mu > 0"),
        (["--data", "/nonexistent/faces"], "--data must be 'synthetic' or an existing directory"),
        (["--server", "http://127.0.0.1:9", "--db", "sqlite:///x.db"], "--db applies to the server"),
        (["--server", "localhost:8000"], "--server must be an http(s) URL"),
        (["--images-per-id", "1"], "--images-per-id must be >= 2"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--algorithm", "fedfr"], "--algorithm fedfr needs --public-set"),
        (["--public-set", "/tmp"], "--public-set applies to fedfr only"),
        (["--algorithm", "fedfr", "--public-set", "/nonexistent/pub"], "--public-set must be a directory"),
        (["--algorithm", "fedface"], "use --ids-per-device 1"),
        (["--hp", "dfc_weight"], "--hp expects KEY=VALUE"),
        (["--hp", "lr=0.1"], "--hp cannot set ['lr']"),
        (["--trainable", "embedding,stem"], "--trainable: unknown parameter group 'stem'"),
        (["--gate", "auc:0.01"], "--gate needs --eval-set"),
        (["--eval-set", "/tmp", "--gate", "auc"], "--gate expects METRIC:MAX_DROP"),
        (["--eval-set", "/tmp", "--gate", "auc:2"], "--gate expects METRIC:MAX_DROP"),
        (["--exclude-identities", "07392"], "--exclude-identities needs --data DIR"),
    ],
)
def test_invalid_combinations_exit_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--devices", "0"], ["--rounds", "-1"], ["--lr", "abc"], ["--model", "resnet"], ["--workers", "0"]],
)
def test_malformed_values_are_argparse_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_module_entry_point_reports_usage_errors() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simulator", "--devices", "3", "--target-reports", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--target-reports (4) cannot exceed --devices (3)" in proc.stderr


def test_small_real_run(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    options = (
        "--devices 4 --rounds 2 --model small --data synthetic --ids-per-device 3 --images-per-id 6 "
        "--heldout-ids 10 --workers 2 --seed 1 --no-progress"
    )
    argv = [
        sys.executable,
        "-m",
        "simulator",
        *options.split(),
        "--json",
        str(out),
        "--work-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) >= {"config", "rounds", "initial_heldout_accuracy", "total_wall_s"}
    assert result["config"]["devices"] == 4 and result["config"]["admin_token"] is None
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["status"] == "aggregated"
        assert r["reports"] == 4 and r["dropped"] == 0
        assert r["mb_uploaded"] > 0 and r["wall_s"] > 0
        assert 0.0 <= r["heldout_accuracy"] <= 1.0
        assert isinstance(r["model_version"], int)
    assert rounds[0]["model_version"] < rounds[1]["model_version"]
    assert 0.0 <= result["initial_heldout_accuracy"] <= 1.0 and result["total_wall_s"] > 0
    # the table on stdout: one row per round
    table_rows = [line for line in proc.stdout.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert len(table_rows) == 2 and all("aggregated" in row for row in table_rows)


def test_partial_gated_run_uploads_the_trainable_tensors_and_shows_the_served_version(tmp_path: Path) -> None:
    from facefl import codec
    from facefl.data import write_image_folder
    from facefl.models import build_backbone, resolve_trainable, state_to_numpy, trainable_names

    eval_dir = write_image_folder(tmp_path / "heldout", range(500, 510), images_per_identity=4, image_size=64)
    out = tmp_path / "result.json"
    options = (
        "--devices 3 --rounds 1 --model small --data synthetic --ids-per-device 3 --images-per-id 6 "
        "--heldout-ids 10 --workers 2 --seed 1 --no-progress --trainable embedding --gate auc:1"
    )
    argv = [
        sys.executable,
        "-m",
        "simulator",
        *options.split(),
        "--eval-set",
        str(eval_dir),
        "--json",
        str(out),
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["rounds"]
    assert r["status"] == "aggregated" and r["reports"] == 3
    # a gate that allows any drop serves the round's version
    assert r["served_version"] == r["model_version"] == 2
    # each device uploaded the embedding group's deltas (MB up also counts its check-in bodies, a few
    # hundred bytes, and is rounded to 100 bytes)
    base = state_to_numpy(build_backbone("small", seed=0))
    names = trainable_names(base, resolve_trainable("small", ["embedding"]))
    per_device = len(codec.encode({k: base[k] for k in names}))
    assert r["mb_uploaded"] * 1e6 == pytest.approx(3 * per_device, abs=3000)
    assert per_device < len(codec.encode(base)) / 4
    (row,) = [line for line in proc.stdout.splitlines() if line.strip().startswith("1 ")]
    assert "aggregated" in row and " v2 " in row


def test_the_model_defaults_to_the_initial_checkpoints_architecture(tmp_path: Path) -> None:
    from facefl.checkpoint import save_checkpoint
    from facefl.models import build_backbone
    from simulator.cli import add_arguments, config_from_args

    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", build_backbone("tiny", seed=0), "tiny")
    parser = __import__("argparse").ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--initial-model", str(ckpt)])).model == "tiny"
    assert config_from_args(parser.parse_args([])).model == "small"
    explicit = parser.parse_args(["--initial-model", str(ckpt), "--model", "mobilefacenet"])
    assert config_from_args(explicit).model == "mobilefacenet"  # an explicit choice wins (the server checks)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert (
        config_from_args(parser.parse_args(["--initial-model", str(tmp_path / "junk.safetensors")])).model
        == "small"
    )
