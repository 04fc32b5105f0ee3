"""Embedders: PyTorch and ONNX Runtime give the same embeddings through the one preprocessing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from facefl.checkpoint import save_checkpoint
from facefl.data import DataError, Preprocessing, synthetic_identity_images
from facefl.embedders import (
    PREPROCESSING_METADATA_KEY,
    Embedder,
    OnnxEmbedder,
    TorchEmbedder,
    load_embedder,
)
from facefl.models import build_backbone

torch.set_num_threads(1)


def _model(dim: int = 32) -> torch.nn.Module:
    """A small backbone with non-trivial BatchNorm statistics (so eval mode matters)."""
    model = build_backbone("small", dim, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def _faces(n: int = 6, size: int = 80) -> np.ndarray:
    """Real-looking inputs at another size than the model's, so the resize step is exercised."""
    return np.concatenate([synthetic_identity_images(k, 2, size, seed=0) for k in range(n // 2)])


def _export(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is legacy
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 64, 64),),
            path,
            dynamo=False,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=17,
        )
    if metadata:
        graph = onnx.load(path)
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, path)
    return path


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_torch_embedder_arrays_and_paths(tmp_path: Path) -> None:
    model = _model()
    embedder = TorchEmbedder(model, "small", batch_size=4)
    assert isinstance(embedder, Embedder) and embedder.image_size == 64
    images = _faces()
    emb = embedder.embed(images)
    assert emb.shape == (6, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # exactly the model on Preprocessing's output
    with torch.no_grad():
        direct = model(torch.from_numpy(Preprocessing(64).batch(images))).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    # image files give the same embeddings as the decoded arrays (PNG is lossless)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    np.testing.assert_allclose(embedder.embed(paths), emb, atol=1e-6)
    np.testing.assert_allclose(embedder.embed([str(p) for p in paths[:2]]), emb[:2], atol=1e-6)
    assert embedder.embed(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 32)
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed(images.astype(np.float32))
    with pytest.raises(TypeError, match="single path"):
        embedder.embed(paths[0])  # type: ignore[arg-type]
    with pytest.raises(DataError, match="cannot read image"):
        embedder.embed([tmp_path / "missing.png"])


def test_flip_averages_the_mirror_and_renormalises() -> None:
    model = _model()
    images = _faces()
    plain = TorchEmbedder(model, "small").embed(images)
    mirrored = TorchEmbedder(model, "small").embed(np.ascontiguousarray(images[:, :, ::-1]))
    flipped = TorchEmbedder(model, "small", flip=True).embed(images)
    expected = plain + mirrored
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(flipped, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flipped, axis=1), 1.0, atol=1e-5)
    # flip TTA is mirror-invariant
    flipped_of_mirror = TorchEmbedder(model, "small", flip=True).embed(
        np.ascontiguousarray(images[:, :, ::-1])
    )
    np.testing.assert_allclose(flipped_of_mirror, flipped, atol=1e-5)
    assert _cosines(plain, flipped).min() < 0.99999  # it changed something


def test_onnx_matches_torch(tmp_path: Path) -> None:
    model = _model()
    path = _export(model, tmp_path / "small.onnx")
    images = _faces(8)
    for flip in (False, True):
        reference = TorchEmbedder(model, "small", flip=flip).embed(images)
        onnx_embedder = OnnxEmbedder(path, flip=flip, batch_size=3)
        assert onnx_embedder.image_size == 64
        got = onnx_embedder.embed(images)
        assert got.shape == reference.shape and got.dtype == np.float32
        assert _cosines(got, reference).min() >= 0.9999
    # dispatch on the suffix; a checkpoint goes to PyTorch
    assert isinstance(load_embedder(path), OnnxEmbedder)
    ckpt = save_checkpoint(tmp_path / "small.safetensors", model, "small")
    torch_embedder = load_embedder(ckpt, flip=True)
    assert isinstance(torch_embedder, TorchEmbedder) and torch_embedder.flip
    np.testing.assert_allclose(
        torch_embedder.embed(images), TorchEmbedder(model, "small", flip=True).embed(images), atol=1e-5
    )


def test_onnx_preprocessing_from_metadata(tmp_path: Path) -> None:
    model = _model()
    custom = Preprocessing(64, mean=0.4, std=0.3, colour="BGR")
    path = _export(model, tmp_path / "meta.onnx", {PREPROCESSING_METADATA_KEY: json.dumps(custom.to_dict())})
    embedder = OnnxEmbedder(path)
    assert embedder.preprocessing == custom
    images = _faces()
    reference = TorchEmbedder(model, "small", preprocessing=custom).embed(images)
    assert _cosines(embedder.embed(images), reference).min() >= 0.9999
    default = TorchEmbedder(model, "small").embed(images)
    assert _cosines(embedder.embed(images), default).min() < 0.999  # the metadata was honoured

    bad = _export(model, tmp_path / "bad.onnx", {PREPROCESSING_METADATA_KEY: json.dumps({"image_size": 32})})
    with pytest.raises(ValueError, match="image_size 32 != model input 64"):
        OnnxEmbedder(bad)


def _tiny_graph(path: Path, shape: list[int | str]) -> Path:
    """A one-node model (input -> Flatten) with the given input shape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], "D"])
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"], axis=1)], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_onnx_refuses_non_nchw_and_unknown_sizes(tmp_path: Path) -> None:
    nhwc = _tiny_graph(tmp_path / "nhwc.onnx", ["N", 16, 16, 3])
    with pytest.raises(ValueError, match="NCHW"):
        OnnxEmbedder(nhwc)
    with pytest.raises(ValueError, match="NCHW"):
        OnnxEmbedder(_tiny_graph(tmp_path / "rank2.onnx", ["N", 768]))
    with pytest.raises(ValueError, match="not fixed"):
        OnnxEmbedder(_tiny_graph(tmp_path / "dyn.onnx", ["N", 3, "H", "W"]))
    # a symbolic spatial size is fine once the preprocessing is given
    flat = OnnxEmbedder(
        _tiny_graph(tmp_path / "dyn2.onnx", ["N", 3, "H", "W"]), preprocessing=Preprocessing(8)
    )
    assert flat.embed(np.zeros((2, 8, 8, 3), np.uint8)).shape == (2, 192)
    # a fixed batch of 1 runs image by image
    single = OnnxEmbedder(_tiny_graph(tmp_path / "one.onnx", [1, 3, 8, 8]), batch_size=16)
    out = single.embed(_faces(4, 8))
    assert out.shape == (4, 192)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with pytest.raises(DataError, match="does not exist"):
        OnnxEmbedder(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load ONNX model"):
        OnnxEmbedder(junk)
