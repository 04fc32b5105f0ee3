"""export.onnx: the generic and personalized models to one self-contained ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from export.errors import ExportError
from export.onnx import (
    DEFAULT_THRESHOLD_KEY,
    KIND_KEY,
    export_onnx,
    graph_op_types,
    load_generic,
    load_personalized,
)
from facefl.data import Preprocessing
from facefl.embedders import PREPROCESSING_METADATA_KEY
from tests.export.helpers import DIM, cosines, faces, small_backbone, write_checkpoint, write_device_state


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["embeddings"], {"images": x})[0])


def test_generic_export_is_one_checked_file_with_metadata_and_dynamic_batch(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "m.safetensors")
    out_dir = tmp_path / "out"
    path = export_onnx(load_generic(ckpt), out_dir / "m.onnx", default_threshold=0.42)
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx"]  # no external-data side files
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), (
        "weights must be inside the file"
    )
    assert "PRelu" not in graph_op_types(path) and {"Relu", "Conv"} <= graph_op_types(path)
    props = {p.key: p.value for p in model.metadata_props}
    assert Preprocessing.from_dict(json.loads(props[PREPROCESSING_METADATA_KEY])) == Preprocessing(64)
    assert props[KIND_KEY] == "generic" and float(props[DEFAULT_THRESHOLD_KEY]) == 0.42

    module = small_backbone()
    pre = Preprocessing(64)
    for n in (1, 5):  # the batch axis is dynamic
        x = pre.batch(faces(range(n), 1))
        got = _run(path, x)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        assert got.shape == (n, DIM)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert cosines(got, expected).min() >= 0.9999


def test_personalized_export_applies_the_converter_then_normalizes(tmp_path: Path) -> None:
    state = write_device_state(tmp_path / "state", seed=3)
    source = load_personalized(state)
    assert source.kind == "personalized" and source.embedding_dim == DIM
    path = export_onnx(source, tmp_path / "p.onnx")
    x = Preprocessing(64).batch(faces(range(4), 2))
    got = _run(path, x)

    # reference computed independently of export.onnx: backbone, then converter from the file, normalised
    from safetensors.numpy import load_file

    dfc = load_file(str(state / "dfc.safetensors"))
    with torch.no_grad():
        backbone_emb = small_backbone(seed=3)(torch.from_numpy(x))
        expected = F.normalize(
            backbone_emb @ torch.from_numpy(dfc["converter.weight"]).T
            + torch.from_numpy(dfc["converter.bias"]),
            dim=1,
        ).numpy()
    assert cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the converter matters: the personalized embedding is not the generic one
    assert cosines(got, backbone_emb.numpy()).mean() < 0.95
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props[KIND_KEY] == "personalized"


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    not_ckpt = tmp_path / "x.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(not_ckpt))
    with pytest.raises(ExportError, match="not a facefl checkpoint"):
        load_generic(not_ckpt)
    with pytest.raises(ExportError, match="does not exist"):
        load_personalized(tmp_path / "nope")
    state = write_device_state(tmp_path / "state")
    (state / "dfc.safetensors").unlink()
    with pytest.raises(ExportError, match=r"DFC file .* does not exist"):
        load_personalized(state)
    save_file({"binary.weight": np.zeros((2, DIM), np.float32)}, str(state / "dfc.safetensors"))
    with pytest.raises(ExportError, match=r"no converter\.bias, converter\.weight"):
        load_personalized(state)
    save_file(
        {"converter.weight": np.zeros((DIM, 8), np.float32), "converter.bias": np.zeros(DIM, np.float32)},
        str(state / "dfc.safetensors"),
    )
    with pytest.raises(ExportError, match=r"\(32, 32\) and \(32,\) are required"):
        load_personalized(state)
    (state / "personalized.safetensors").unlink()
    with pytest.raises(ExportError, match=r"no personalized\.safetensors"):
        load_personalized(state)
    with pytest.raises(ExportError, match="cosine in"):
        export_onnx(load_generic(write_checkpoint(tmp_path / "m.safetensors")), tmp_path / "m.onnx",
                    default_threshold=2.0)  # fmt: skip
