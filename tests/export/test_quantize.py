"""export.quantize: static int8 (QDQ, per-channel), and export.parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.errors import ExportError
from export.onnx import export_onnx, graph_op_types, load_generic
from export.parity import FP32_MIN_COSINE, INT8_MIN_COSINE, parity_report
from export.quantize import QUANTIZATION_KEY, quantize_static_int8
from facefl.embedders import PREPROCESSING_METADATA_KEY
from tests.export.helpers import faces, write_checkpoint


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quant")
    ckpt = write_checkpoint(root / "m.safetensors")
    return ckpt, export_onnx(load_generic(ckpt), root / "m.onnx")


def test_int8_is_small_quantized_and_close_to_pytorch(fp32: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, fp32_path = fp32
    calibration = faces(range(10), 4, size=80)  # other size than the model's: resized by its preprocessing
    int8 = quantize_static_int8(fp32_path, tmp_path / "m.int8.onnx", calibration)
    ops = graph_op_types(int8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "PRelu" not in ops
    model = onnx.load(str(int8))
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert any(len(t.dims) == 4 for t in int8_weights)  # convolution kernels stored as int8
    inits = {t.name: t for t in model.graph.initializer}
    weight_scales = [
        inits[n.input[1]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
        and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4
    ]  # fmt: skip
    assert weight_scales and all(s.dims and s.dims[0] > 1 for s in weight_scales), "one scale per channel"
    props = {p.key: p.value for p in model.metadata_props}
    assert PREPROCESSING_METADATA_KEY in props  # carried over from the fp32 model
    assert json.loads(props[QUANTIZATION_KEY])["calibration_images"] == 40
    assert int8.stat().st_size < 0.45 * fp32_path.stat().st_size

    source = load_generic(ckpt)
    probes = faces(range(20, 30), 3, seed=5)  # identities not used for calibration
    report = parity_report(source.module, source.preprocessing, int8, probes, INT8_MIN_COSINE)
    assert report.images == 30 and report.passed, report.format()
    assert report.mean_cosine < 1.0  # it really is quantized, not a copy of the fp32 graph


def test_quantize_refuses_bad_inputs(fp32: tuple[Path, Path], tmp_path: Path) -> None:
    _, fp32_path = fp32
    with pytest.raises(ExportError, match="at least one calibration image"):
        quantize_static_int8(fp32_path, tmp_path / "q.onnx", np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(ExportError, match="does not exist"):
        quantize_static_int8(tmp_path / "nope.onnx", tmp_path / "q.onnx", faces(range(1), 1))
    bare = onnx.load(str(fp32_path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ExportError, match=r"no 'facefl\.preprocessing' metadata"):
        quantize_static_int8(tmp_path / "bare.onnx", tmp_path / "q.onnx", faces(range(1), 1))


def test_parity_report_detects_a_different_model(fp32: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, fp32_path = fp32
    source = load_generic(ckpt)
    images = faces(range(4), 2)
    same = parity_report(source.module, source.preprocessing, fp32_path, images)
    assert same.passed and same.min_cosine >= FP32_MIN_COSINE and "ok" in same.format()
    other = export_onnx(
        load_generic(write_checkpoint(tmp_path / "o.safetensors", seed=9)), tmp_path / "o.onnx"
    )
    report = parity_report(source.module, source.preprocessing, other, images)
    assert not report.passed and report.min_cosine < 0.99 and "FAILED" in report.format()
    assert report.to_dict()["passed"] is False
