"""``dlib-resnet``: dlib's face ResNet imported into facefl, against dlib itself (PyTorch and ONNX Runtime).

Needs the ``pretrained`` extra (dlib-bin and face_recognition_models), which CI and ``make install`` install,
so a missing one fails rather than skips. The parity tests compare with ``dlib.face_recognition_model_v1``
on chips made here, so they need no shared data; the ``realdata`` ones use LFW when it is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dlib  # the pretrained extra (dlib-bin): CI installs it, so a missing one fails rather than skips
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facefl.checkpoint import Checkpoint, build_from_checkpoint, load_checkpoint
from facefl.data import preprocessing_for, synthetic_identity_images
from facefl.embedders import OnnxEmbedder, TorchEmbedder
from facefl.importers.cli import import_dlib_resnet
from facefl.importers.dlib_dat import find_model_file
from facefl.models import ARCHITECTURES, build_backbone, load_numpy_state, state_to_numpy
from facefl.models.dlib_resnet import DLIB_PREPROCESSING, PARAMETER_GROUPS, add_zero_padded

# One thread: on a shared 2-core runner, two OpenMP threads spin-wait on each other and run ~10x slower.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"
PARITY = 0.9999  # minimum cosine between facefl's embedding and dlib's descriptor


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_dlib_resnet(tmp_path_factory.mktemp("dlib") / "dlib-resnet.safetensors")


@pytest.fixture(scope="module")
def imported(checkpoint_path: Path) -> Checkpoint:
    return load_checkpoint(checkpoint_path)


@pytest.fixture(scope="module")
def dlib_net() -> Any:
    return dlib.face_recognition_model_v1(str(find_model_file()))


@pytest.fixture(scope="module")
def onnx_embedder(checkpoint_path: Path) -> OnnxEmbedder:
    from export.onnx import export_onnx, load_generic

    onnx_path = export_onnx(load_generic(checkpoint_path), checkpoint_path.with_suffix(".onnx"))
    # the embedder takes its preprocessing from the ONNX metadata, not from facefl's registry
    return OnnxEmbedder(onnx_path)


def _chips() -> np.ndarray:
    """150x150 uint8 RGB chips made here: synthetic faces of three identities, resized as facefl does it."""
    faces = np.concatenate([synthetic_identity_images(i, 2, 112, seed=3) for i in range(3)])
    return np.stack([DLIB_PREPROCESSING.to_uint8(face) for face in faces])


def _dlib_descriptors(net: Any, chips: np.ndarray) -> np.ndarray:
    # the aligned-chip overload: exactly these 150x150 pixels, num_jitters=0 (no jitter, no resize)
    return np.array([np.asarray(net.compute_face_descriptor(chip, 0)) for chip in chips])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_registry_preprocessing_and_groups() -> None:
    arch = ARCHITECTURES["dlib-resnet"]
    assert arch.image_size == 150 and arch.default_embedding_dim == 128
    assert preprocessing_for("dlib-resnet") == DLIB_PREPROCESSING
    # dlib's input layer: (pixel - [122.782, 117.001, 104.298]) / 256, RGB
    pixels = np.array([[[0, 128, 255]]], np.uint8).repeat(150, 0).repeat(150, 1)
    x = DLIB_PREPROCESSING(pixels)[:, 0, 0]
    np.testing.assert_allclose(x, (np.array([0, 128, 255]) - [122.782, 117.001, 104.298]) / 256, atol=1e-6)
    # the groups partition the parameters
    names = [name for name, _ in build_backbone("dlib-resnet", seed=0).named_parameters()]
    assert arch.parameter_groups == PARAMETER_GROUPS
    for name in names:
        owners = [g for g, prefixes in arch.parameter_groups.items() if name.startswith(prefixes)]
        assert len(owners) == 1, (name, owners)
    assert list(arch.parameter_groups) == ["stem", "level4", "level3", "level2", "level1", "level0", "fc"]


def test_zero_padded_sum() -> None:
    a = torch.ones(1, 2, 2, 2)
    b = torch.full((1, 3, 3, 3), 10.0)
    out = add_zero_padded(a, b)
    assert out.shape == (1, 3, 3, 3)
    assert out[0, :2, :2, :2].eq(11).all() and out[0, 2].eq(10).all() and out[0, :, 2].eq(10).all()


def test_imported_state_matches_the_module_exactly(imported: Checkpoint) -> None:
    model = build_backbone("dlib-resnet", seed=0)
    expected = {name: tuple(v.shape) for name, v in state_to_numpy(model).items()}
    assert {name: v.shape for name, v in imported.tensors.items()} == expected
    load_numpy_state(model, imported.tensors)  # strict: names and shapes
    assert imported.architecture == "dlib-resnet" and imported.embedding_dim == 128
    assert imported.preprocessing == DLIB_PREPROCESSING  # stored in the checkpoint, read back
    assert imported.metadata["extra"]["source_format"] == "dlib"
    assert all(np.isfinite(v).all() for v in imported.tensors.values())


def test_stage_sizes_follow_dlib() -> None:
    model = build_backbone("dlib-resnet", seed=0).eval()
    sizes = {}
    for name in ("stem", "level4", "level3", "level2", "level1", "level0"):
        module = getattr(model, name)
        module.register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 150, 150))
    assert sizes == {
        "stem": (1, 32, 35, 35),
        "level4": (1, 32, 35, 35),
        "level3": (1, 64, 17, 17),
        "level2": (1, 128, 8, 8),
        "level1": (1, 256, 4, 4),  # the 3x3 body is zero-padded to the 4x4 shortcut
        "level0": (1, 256, 2, 2),
    }


def test_one_training_step_changes_every_parameter(imported: Checkpoint) -> None:
    model = build_from_checkpoint(imported).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.from_numpy(DLIB_PREPROCESSING.batch(_chips()[:4]))
    target = F.normalize(torch.randn(4, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    loss = (1 - (model(x) * target).sum(dim=1)).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)


def test_parity_with_dlib_in_torch_and_onnx(
    imported: Checkpoint, dlib_net: Any, onnx_embedder: OnnxEmbedder
) -> None:
    chips = _chips()
    reference = _dlib_descriptors(dlib_net, chips)
    torch_emb = TorchEmbedder(build_from_checkpoint(imported), "dlib-resnet", device="cpu",
                              preprocessing=imported.preprocessing).embed(chips)  # fmt: skip
    onnx_emb = onnx_embedder.embed(chips)
    assert onnx_embedder.preprocessing == DLIB_PREPROCESSING
    assert _cosines(torch_emb, reference).min() >= PARITY
    assert _cosines(onnx_emb, reference).min() >= PARITY
    # unrelated faces stay apart (the chips are not all alike)
    assert _cosines(torch_emb[:1], torch_emb[2:3])[0] < 0.99


def test_descriptor_scale_matches_dlib(imported: Checkpoint, dlib_net: Any) -> None:
    """Before facefl's L2 normalisation the output is dlib's descriptor itself (not just its direction)."""
    chips = _chips()[:2]
    model = build_from_checkpoint(imported)
    with torch.no_grad():
        raw = model.features(torch.from_numpy(imported.preprocessing.batch(chips))).numpy()
    np.testing.assert_allclose(raw, _dlib_descriptors(dlib_net, chips), rtol=0, atol=2e-4)


# ------------------------------------------------------------------------------------------ real data

LFW = SHARED / "lfw"


def _lfw_chips(count: int) -> np.ndarray:
    from facefl.data import ImageFolder, load_image

    samples = ImageFolder(LFW).samples
    picks = np.linspace(0, len(samples) - 1, count).round().astype(int)
    return np.stack([DLIB_PREPROCESSING.to_uint8(load_image(samples[i][0])) for i in picks])


@pytest.mark.realdata
@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason="../shared/data/lfw is absent")
def test_parity_on_lfw_chips(imported: Checkpoint, dlib_net: Any, onnx_embedder: OnnxEmbedder) -> None:
    chips = _lfw_chips(20)  # 112x112 aligned chips, same geometry as dlib's 150x150 ones
    reference = _dlib_descriptors(dlib_net, chips)
    torch_emb = TorchEmbedder(build_from_checkpoint(imported), "dlib-resnet", device="cpu").embed(chips)
    assert _cosines(torch_emb, reference).min() >= PARITY
    assert _cosines(onnx_embedder.embed(chips), reference).min() >= PARITY


@pytest.mark.realdata
@pytest.mark.skipif(not (LFW / "pairs.txt").is_file(), reason="../shared/data/lfw is absent")
def test_lfw_test_folds_accuracy(checkpoint_path: Path) -> None:
    """What `facefl eval CHECKPOINT --lfw` measures: LFW pair folds 6-10 at 150x150 (~70 s on 2 cores)."""
    from facefl.evaluation import VerificationSet, evaluate_verification

    embedder = TorchEmbedder.from_checkpoint(checkpoint_path, device="cpu")  # the checkpoint's preprocessing
    assert embedder.preprocessing == DLIB_PREPROCESSING
    report = evaluate_verification(embedder, VerificationSet.from_dir(LFW, embedder.image_size))
    assert report["pairs"] == 3000
    assert report["accuracy"] >= 0.99, report  # measured 0.9903
    assert report["tar@far=1e-3"] >= 0.9, report  # measured 0.9353
