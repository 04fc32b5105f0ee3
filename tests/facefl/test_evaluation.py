"""Generic and personalized evaluation on generated faces, and the `facefl eval` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facefl.checkpoint import save_checkpoint
from facefl.cli import main
from facefl.data import DataError, write_image_folder
from facefl.embedders import TorchEmbedder
from facefl.evaluation import (
    VerificationSet,
    evaluate_personalized,
    evaluate_verification,
    load_device_protocol,
    load_devices,
    load_strangers,
)
from facefl.models import build_backbone


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("faces"), range(16), 6, image_size=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save_checkpoint(path, build_backbone("small", seed=1), "small", 128)
    return path


def test_folder_verification_set_is_balanced_with_ten_folds(faces: Path) -> None:
    vset = VerificationSet.from_dir(faces, 64)
    assert vset.is_same.sum() == (~vset.is_same).sum() > 0
    assert set(vset.folds.tolist()) <= set(range(1, 11)) and vset.images.shape[1:] == (64, 64, 3)
    assert vset.index.max() < len(vset.images)


def test_missing_eval_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        VerificationSet.from_dir(tmp_path / "nope", 64)


def test_generic_and_personalized_reports(faces: Path) -> None:
    embedder = TorchEmbedder(build_backbone("small", seed=1).eval(), "small")
    report = evaluate_verification(embedder, VerificationSet.from_dir(faces, 64))
    assert 0.0 <= report["accuracy"] <= 1.0 and report["pairs"] > 0
    devices = load_devices(
        faces, num_devices=3, ids_per_device=3, heldout_ids=2, test_fraction=0.34, seed=0, image_size=64
    )
    assert len(devices) == 3 and all(len(d.test_labels) and len(d.train_labels) for d in devices)
    shared = evaluate_personalized(embedder, devices)
    per_device = evaluate_personalized([embedder] * 3, devices)  # the same model on every device
    for key in ("tar@far=1e-2", "dir@far=1e-2", "rank1"):
        assert per_device[key] == pytest.approx(shared[key])


def test_strangers_are_the_held_out_people_and_impostors_for_every_device(faces: Path) -> None:
    from facefl.data import ImageFolder
    from facefl.data.protocol import plan_devices

    plan_args = {"num_devices": 3, "ids_per_device": 3, "heldout_ids": 2, "seed": 0, "image_size": 64}
    devices = load_devices(faces, test_fraction=0.34, **plan_args)
    plan = plan_devices(ImageFolder(faces), 3, 3, 2, 0)
    strangers = load_strangers(faces, **plan_args)
    assert len(strangers) == 12  # the 2 held-out identities x 6 images
    # both from one plan: the same devices and strangers as the two loaders apart
    both, both_strangers = load_device_protocol(faces, test_fraction=0.34, **plan_args)
    np.testing.assert_array_equal(both_strangers, strangers)
    for a, b in zip(both, devices, strict=True):
        np.testing.assert_array_equal(a.test_images, b.test_images)
        np.testing.assert_array_equal(a.train_labels, b.train_labels)
    # an excluded identity is neither a stranger nor on a device (the plan is drawn without it)
    excluded = [plan.heldout[0], plan.devices[0][0]]
    replan = plan_devices(ImageFolder(faces), 3, 3, 2, 0, exclude=excluded)
    assert not set(excluded) & {*replan.heldout, *(n for d in replan.devices for n in d)}
    assert len(load_strangers(faces, exclude=excluded, **plan_args)) == 12
    kept = load_devices(faces, test_fraction=0.34, exclude=excluded, **plan_args)
    assert sum(len(d.train_labels) + len(d.test_labels) for d in kept) == 9 * 6
    with pytest.raises(DataError, match="excluded identities not in"):
        load_strangers(faces, exclude=["no-such-person"], **plan_args)

    embedder = TorchEmbedder(build_backbone("small", seed=1).eval(), "small")
    without = evaluate_personalized(embedder, devices)
    report = evaluate_personalized(embedder, devices, strangers=strangers)
    per_device = evaluate_personalized([embedder] * 3, devices, strangers=strangers)
    assert report["strangers"] == 12.0 and without["strangers"] == 0.0
    for key in ("tar@far=1e-2", "dir@far=1e-2", "rank1"):
        # the "others_only/" keys are the report without strangers, from the same embeddings
        assert report[f"others_only/{key}"] == pytest.approx(without[key])
        assert per_device[key] == pytest.approx(report[key])
    assert report["rank1"] == pytest.approx(without["rank1"])  # strangers are never ranked


def test_eval_command_writes_json_and_roc(faces: Path, checkpoint: Path, tmp_path: Path) -> None:
    out, roc = tmp_path / "r.json", tmp_path / "roc.png"
    argv = ["eval", str(checkpoint), "--lfw", str(faces), "--devices-data", str(faces), "--devices", "3",
            "--ids-per-device", "3", "--heldout-ids", "2", "--test-fraction", "0.34", "--flip",
            "--json", str(out), "--roc", str(roc)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["generic"]) >= {"accuracy", "auc", "tar@far=1e-2", "tar@far=1e-3"}
    assert set(report["personalized"]) >= {"tar@far=1e-2", "dir@far=1e-2", "rank1"}
    assert report["personalized"]["strangers"] > 0  # the held-out people, by default
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv, "--no-strangers"]) == 0
    report = json.loads(out.read_text())
    assert report["personalized"]["strangers"] == 0.0
    assert not any(k.startswith("others_only/") for k in report["personalized"])


def test_eval_command_errors(faces: Path, checkpoint: Path, tmp_path: Path) -> None:
    assert main(["eval", str(checkpoint)]) == 2  # no set to evaluate on
    assert main(["eval", str(tmp_path / "missing.safetensors"), "--lfw", str(faces)]) == 1
    assert main(["eval", str(checkpoint), "--lfw", str(tmp_path / "nowhere")]) == 1
    # an excluded identity that is no folder of the data is an error, not a silent no-op
    argv = ["eval", str(checkpoint), "--devices-data", str(faces), "--devices", "3",
            "--ids-per-device", "3", "--heldout-ids", "2", "--test-fraction", "0.34",
            "--exclude-identities", "id_000001,no-such-person"]  # fmt: skip
    assert main(argv) == 1
    assert main([*argv[:-1], "id_000001"]) == 0


def test_onnx_and_checkpoint_agree(faces: Path, checkpoint: Path, tmp_path: Path) -> None:
    import torch

    from facefl.embedders import OnnxEmbedder

    model = build_backbone("small", seed=1).eval()
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 64, 64), str(onnx_path), input_names=["input"],
                      output_names=["embedding"], dynamic_axes={"input": {0: "n"}}, opset_version=17,
                      dynamo=False)  # fmt: skip
    vset = VerificationSet.from_dir(faces, 64)
    a = evaluate_verification(TorchEmbedder(model, "small"), vset)
    b = evaluate_verification(OnnxEmbedder(onnx_path), vset)
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-3)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=0.02)


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED / "lfw" / "pairs.txt").is_file(), reason="../shared/data/lfw is absent")
def test_real_lfw_test_folds() -> None:
    vset = VerificationSet.from_dir(SHARED / "lfw", 64)
    assert len(vset) == 3000 and int(vset.is_same.sum()) == 1500
    assert sorted(set(vset.folds.tolist())) == [6, 7, 8, 9, 10]


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED / "celeba").is_dir(), reason="../shared/data/celeba is absent")
def test_real_celeba_device_protocol() -> None:
    devices = load_devices(
        SHARED / "celeba",
        num_devices=30,
        ids_per_device=8,
        heldout_ids=50,
        test_fraction=0.3,
        seed=0,
        image_size=32,
    )
    assert len(devices) == 30
    identities = [set(d.train_labels.tolist()) for d in devices]
    assert all(len(ids) == 8 for ids in identities)
    assert len(set().union(*identities)) == 240  # disjoint across devices
    assert all(set(d.test_labels.tolist()) <= ids for d, ids in zip(devices, identities, strict=True))
