"""`facefl export`: the command end to end on tiny models and generated faces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facefl.cli import main
from facefl.data import write_image_folder
from facefl.embedders import OnnxEmbedder
from tests.export.helpers import DIM, write_checkpoint, write_device_state


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("faces"), range(6), 3, image_size=64)


def test_generic_int8_with_parity(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    argv = ["export", "--model", str(ckpt), "--out", str(out), "--int8", "--calibration", str(images),
            "--parity", str(images), "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "parity m.fp32.onnx: 18 images" in printed and "parity m.onnx: 18 images" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["passed"] for p in report["parity"]] == [True, True]
    assert report["parity"][1]["threshold"] == 0.998 and report["parity"][0]["threshold"] == 0.9999
    assert (tmp_path / "m.fp32.onnx").is_file()
    assert OnnxEmbedder(out).embed(sorted(images.rglob("*.png"))[:2]).shape == (2, DIM)


def test_personalized_export(images: Path, tmp_path: Path) -> None:
    state = write_device_state(tmp_path / "state")
    assert main(["export", "--personalized", str(state), "--out", str(tmp_path / "p.onnx"),
                 "--parity", str(images)]) == 0  # fmt: skip
    assert OnnxEmbedder(tmp_path / "p.onnx").metadata["facefl.kind"] == "personalized"


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tmp_path / "m.safetensors")
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--out", out]) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    assert main(["export", "--model", str(ckpt), "--personalized", str(tmp_path), "--out", out]) == 2
    assert main(["export", "--task", "1", "--out", out]) == 2  # --server missing
    assert "--version or --task and --server go together" in capsys.readouterr().err
    assert (
        main(["export", "--task", "1", "--version", "2", "--server", "http://127.0.0.1:9", "--out", out]) == 2
    )
    assert main(["export", "--model", str(ckpt), "--out", out, "--int8"]) == 2
    assert "--int8 needs --calibration" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nope.safetensors"), "--out", out]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--model", str(ckpt), "--out", out, "--parity", str(tmp_path / "empty")]) == 1
    assert "image directory" in capsys.readouterr().err


def test_failed_parity_fails_the_command(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No real export misses 0.9999 on these models, so raise the bar above any reachable cosine to see
    # the command's failure path: non-zero status and a message naming the model and its cosine.
    monkeypatch.setattr("export.parity.FP32_MIN_COSINE", 1.01)
    ckpt = write_checkpoint(tmp_path / "m.safetensors")
    status = main(
        ["export", "--model", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--parity", str(images)]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert "parity check failed: m.onnx min cosine" in err and "< 1.01" in err


@pytest.mark.slow
def test_export_a_server_model_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import torch

    from device_sdk import AdminClient
    from facefl.data import Preprocessing, synthetic_identity_images
    from facefl.embedders import load_embedder
    from facefl.models import build_backbone
    from tests.conftest import ADMIN, LiveServer

    server = LiveServer(tmp_path / "srv").start()
    try:
        with AdminClient(server.base_url, ADMIN) as admin:
            task = admin.create_task("t", embedding_dim=16, seed=4)
        out = tmp_path / "v.onnx"
        version = str(task.current_version)
        assert main(["export", "--server", server.base_url, "--version", version, "--out", str(out)]) == 1
        assert "token" in capsys.readouterr().err
        argv = [
            "export",
            "--server",
            server.base_url,
            "--version",
            version,
            "--token",
            ADMIN,
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        assert main(["export", "--version", version, "--out", str(out)]) == 2  # --server missing
    finally:
        server.stop()
    # the ONNX model embeds like the server's weights (version 1 = the seeded initial model)
    model = build_backbone("small", 16, seed=4).eval()
    faces = synthetic_identity_images(1, 4, 64)
    x = torch.from_numpy(Preprocessing(64).batch(faces))
    with torch.no_grad():
        expected = model(x).numpy()
    got = load_embedder(out).embed(faces)
    assert np.allclose(got, expected, atol=1e-4)
