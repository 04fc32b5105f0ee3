"""`facefl pretrain`: a tiny run on a generated LFW-layout directory, resuming, argument validation."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from facefl.checkpoint import build_from_checkpoint, load_checkpoint, load_training_state, training_state_path
from facefl.data import write_synthetic_lfw
from facefl.pretrain import Augmentation, PretrainConfig, add_arguments, augment, lr_at, main, tune_malloc

TINY = ["--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--embedding-dim", "16", "--workers", "1"]


@pytest.fixture(scope="module")
def lfw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 10 folds x 2 identities, 6 identities in no fold: 16 public identities x 3 images = 48 images
    return write_synthetic_lfw(
        tmp_path_factory.mktemp("lfw"),
        num_folds=10,
        pairs_per_fold=2,
        identities_per_fold=2,
        images_per_identity=3,
        extra_identities=6,
        image_size=64,
    )


def _run(lfw: Path, out: Path, *extra: str) -> int:
    return main(["--data", str(lfw), "--out", str(out), *TINY, *extra])


def test_tiny_run_writes_checkpoint_with_metrics(
    lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.safetensors"
    assert _run(lfw, out) == 0
    text = capsys.readouterr().out
    assert "on 48 images of 16 public identities" in text and "test folds [6, 7, 8, 9, 10]" in text
    ckpt = load_checkpoint(out)
    assert (ckpt.architecture, ckpt.embedding_dim) == ("small", 16)
    metrics = ckpt.metrics
    assert metrics["epoch"] == 2 and metrics["pairs"] == 20.0
    assert {"accuracy", "accuracy_std", "auc", "tar@far=1e-2", "tar@far=1e-3"} <= metrics.keys()
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert all(np.isfinite(row["loss"]) and "accuracy" in row for row in metrics["history"])
    assert ckpt.metadata["extra"]["epochs_done"] == 2
    state = load_training_state(training_state_path(out))
    assert state.metadata["epoch"] == 2 and state.metadata["step"] == 2 * (48 // 16)
    assert "head.weight" in state.tensors and state.tensors["head.weight"].shape == (16, 16)
    assert any(name.startswith("momentum.") for name in state.tensors)
    assert not build_from_checkpoint(out).training
    # a finished run is not retrained
    assert _run(lfw, out) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_resume_is_exact_and_continues(lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    straight = tmp_path / "straight.safetensors"
    assert _run(lfw, straight, "--epochs", "3", "--eval-every", "3") == 0
    resumed = tmp_path / "resumed.safetensors"
    assert _run(lfw, resumed, "--epochs", "3", "--eval-every", "3", "--stop-after", "2") == 0
    assert load_checkpoint(resumed).metadata["extra"]["epochs_done"] == 2
    capsys.readouterr()
    assert _run(lfw, resumed, "--epochs", "3", "--eval-every", "3") == 0
    text = capsys.readouterr().out
    assert "resuming" in text and "after epoch 2" in text
    rows = [line.split()[0] for line in text.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert rows == ["3"]  # only the third epoch was trained
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for name, tensor in a.tensors.items():
        np.testing.assert_array_equal(b.tensors[name], tensor, err_msg=name)
    assert [r["epoch"] for r in b.metrics["history"]] == [1, 2, 3]
    assert a.metrics["accuracy"] == b.metrics["accuracy"]

    # extending a finished run with more epochs continues from where it stopped
    capsys.readouterr()
    assert _run(lfw, straight, "--epochs", "4", "--eval-every", "3") == 0
    assert [r["epoch"] for r in load_checkpoint(straight).metrics["history"]] == [1, 2, 3, 4]


def test_resume_refuses_a_different_run(
    lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    assert _run(lfw, out, "--epochs", "1") == 0
    capsys.readouterr()
    assert _run(lfw, out, "--epochs", "2", "--margin", "0.2") == 1
    err = capsys.readouterr().err
    assert "different run" in err and "margin" in err and "--no-resume" in err
    assert _run(lfw, out, "--epochs", "1", "--margin", "0.2", "--no-resume") == 0
    assert load_checkpoint(out).metadata["extra"]["recipe"]["margin"] == 0.2


def test_validation_folds_are_reported_instead_of_test_folds(
    lfw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.safetensors"
    assert _run(lfw, out, "--epochs", "1", "--val-folds", "4,5") == 0
    text = capsys.readouterr().out
    assert "on 36 images of 12 public identities" in text and "validation folds [4, 5]" in text
    metrics = load_checkpoint(out).metrics
    assert metrics["evaluated_on"] == "validation folds [4, 5]" and metrics["pairs"] == 8.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "0"],
        ["--batch-size", "1"],
        ["--lr", "0"],
        ["--lr", "nan"],
        ["--margin", "-0.1"],
        ["--model", "resnet"],
        ["--val-folds", "x"],
        ["--test-folds", "5-3"],
        ["--resume", "maybe"],
    ],
)
def test_cli_rejects_bad_arguments(
    argv: list[str], tmp_path: Path, lfw: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(lfw), "--out", str(tmp_path / "m.safetensors"), *argv])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_reports_bad_values_and_missing_data(
    tmp_path: Path, lfw: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m.safetensors")])  # --data is required
    assert main(["--data", str(lfw), "--out", str(tmp_path / "m.st"), "--augment", "blur=1"]) == 2
    assert "--augment" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "m.st")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["--data", str(lfw), "--out", str(tmp_path / "m.st"), "--val-folds", "6"]) == 1
    assert "both test and validation" in capsys.readouterr().err
    assert not (tmp_path / "m.st").exists()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "d", "--out", "o", "--test-folds", "6-8,10", "--no-resume"])
    assert args.test_folds == (6, 7, 8, 10) and args.resume is False


def test_config_validation_schedule_and_augmentation() -> None:
    with pytest.raises(ValueError, match="epochs"):
        PretrainConfig(data=Path("d"), out=Path("o"), epochs=0)
    with pytest.raises(ValueError, match="probabilities"):
        Augmentation(flip=2.0)
    # warmup then cosine to min_lr
    lrs = [lr_at(s, 100, 10, 0.1, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 1e-3
    assert lr_at(100, 100, 10, 0.1, 0.1) == pytest.approx(0.01)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    y = augment(x, Augmentation(), torch.Generator().manual_seed(0), 0.5, 0.5)
    assert y.shape == x.shape and float(y.min()) >= -1.0 - 1e-6 and float(y.max()) <= 1.0 + 1e-6
    none = Augmentation(0, 0, 0, 0, 0, 0, 0, 0)
    assert torch.equal(augment(x, none, torch.Generator().manual_seed(0), 0.5, 0.5), x)
    flip_only = Augmentation(1.0, 0, 0, 0, 0, 0, 0, 0)
    assert torch.equal(augment(x, flip_only, torch.Generator(), 0.5, 0.5), x.flip(3))
    # per-channel normalisation (e.g. dlib-resnet's): equal channels give what one number gives
    half = np.full(3, 0.5, np.float32)
    colour = Augmentation(0, 0, 0, 0, 0.3, 0.3, 0.3, 0.5)
    expected = augment(x, colour, torch.Generator().manual_seed(1), 0.5, 0.5)
    torch.testing.assert_close(augment(x, colour, torch.Generator().manual_seed(1), half, half), expected)
    assert isinstance(tune_malloc(), bool)
