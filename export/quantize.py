"""Static int8 quantization of an exported face model with ONNX Runtime (QDQ format, per-channel weights).

Steps, as ONNX Runtime's quantization guide recommends for CNNs:

1. ``quant_pre_process``: symbolic shape inference and graph optimisation (BatchNorm folded into the
   convolutions, so each convolution gets one per-channel scale instead of quantizing BN separately);
2. calibration: the fp32 model runs over the calibration images (preprocessed with the model's own
   :class:`facefl.data.Preprocessing`), recording the range of every activation;
3. ``quantize_static`` with QDQ (QuantizeLinear/DequantizeLinear pairs around int8 operators), int8
   weights with one scale per output channel, uint8 activations, MinMax calibration.

The calibration images should be the device's own faces (they never leave it): the activation ranges then
match what the model will see.

What is quantized, and why (measured on the pretrained ``small`` model after 40 epochs, 200 CelebA
calibration images, parity on 300 LFW images, min / mean cosine to PyTorch): only convolutions are
quantized (the bulk of compute and weights; elementwise ops such as FastPReLU's Relu/Mul/Sub stay in
float instead of paying a quantize/dequantize round trip each, which was also the fastest variant). The
layers nearest the input and the output are the most sensitive and hold few weights, so the first two
convolutions, the last convolution (small's GDConv, MobileFaceNet's embedding projection) and the head
after it stay in float: quantizing all other convolutions gives 0.9984 / 0.9993, while also quantizing
the last convolution gives 0.9912 / 0.9989 and quantizing every operator was worse still. ORT's
histogram calibrators (percentile, entropy) fail on this graph in onnxruntime 1.32
(zero-range tensors), and moving-average MinMax was worse (0.991).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from export.errors import ExportError
from export.onnx import save_model_atomic
from facefl.data import Preprocessing
from facefl.embedders import PREPROCESSING_METADATA_KEY

__all__ = ["QUANTIZATION_KEY", "QUANTIZED_OP_TYPES", "compact_names", "quantize_static_int8"]

#: metadata_props key recording how the model was quantized (JSON).
QUANTIZATION_KEY = "facefl.quantization"
#: Operator types quantized to int8 (see the module docstring).
QUANTIZED_OP_TYPES = ("Conv",)
_CALIBRATION_BATCH = 16


def _read_preprocessing(model: object) -> Preprocessing:
    props = {p.key: p.value for p in model.metadata_props}  # type: ignore[attr-defined]
    if PREPROCESSING_METADATA_KEY not in props:
        raise ExportError(
            f"the model has no {PREPROCESSING_METADATA_KEY!r} metadata; quantize a model written by "
            "export.onnx.export_onnx"
        )
    return Preprocessing.from_dict(json.loads(props[PREPROCESSING_METADATA_KEY]))


def float_nodes(model: object, keep_first_convs: bool = True, keep_head: bool = True) -> list[str]:
    """Names of the nodes kept in float: the first two convolutions, the last one and all nodes after it."""
    nodes = list(model.graph.node)  # type: ignore[attr-defined]
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    keep: list[str] = []
    if keep_first_convs:
        keep += [nodes[i].name for i in convs[:2]]
    if keep_head:
        keep += [n.name for n in nodes[(convs[-1] if convs else len(nodes)) :]]
    return [name for name in keep if name]


def compact_names(model: object) -> None:
    """Rename internal tensors and nodes to short ids, in place (graph input/output names are kept).

    The quantizer adds a QuantizeLinear/DequantizeLinear pair per tensor with long derived names; in a
    model of ~1M int8 weights those names are ~15% of the file. Shape annotations of intermediate values
    (``value_info``) are dropped too: ONNX Runtime infers them when it loads the model.
    """
    graph = model.graph  # type: ignore[attr-defined]
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return renamed.setdefault(name, f"t{len(renamed)}")

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for k, node in enumerate(graph.node):
        node.name = f"n{k}"
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    del graph.value_info[:]


def quantize_static_int8(
    fp32_model: str | Path,
    out: str | Path,
    calibration_images: np.ndarray | Sequence[np.ndarray],
    *,
    per_channel: bool = True,
    keep_first_convs_float: bool = True,
    keep_head_float: bool = True,
) -> Path:
    """Quantize ``fp32_model`` (an :func:`export.onnx.export_onnx` file) to int8; writes ``out``.

    ``calibration_images``: uint8 RGB face crops, an (N, H, W, 3) array or a list of HxWx3 arrays (any
    size; resized by the model's preprocessing). The metadata of the fp32 model is carried over, plus
    :data:`QUANTIZATION_KEY`. The output is one self-contained file.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_model, out = Path(fp32_model), Path(out)
    if not fp32_model.is_file():
        raise ExportError(f"ONNX model {fp32_model} does not exist")
    source = onnx.load(str(fp32_model))
    preprocessing = _read_preprocessing(source)
    if len(calibration_images) == 0:
        raise ExportError("quantization needs at least one calibration image")
    batch = preprocessing.batch(calibration_images)  # (N, 3, S, S) float32
    input_name = source.graph.input[0].name

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(
                batch[lo : lo + _CALIBRATION_BATCH] for lo in range(0, len(batch), _CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._batches, None)
            return None if chunk is None else {input_name: chunk}

    with tempfile.TemporaryDirectory(prefix="facefl-quant-") as work_dir:
        work = Path(work_dir)
        prepared = work / "prepared.onnx"
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=False)
        prepared_model = onnx.load(str(prepared))
        exclude = float_nodes(prepared_model, keep_first_convs_float, keep_head_float)
        quantized = work / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            nodes_to_exclude=exclude,
            use_external_data_format=False,
        )
        model = onnx.load(str(quantized))
        compact_names(model)
        onnx.checker.check_model(model)
        # the quantizer does not keep metadata_props: copy them, plus how the model was quantized
        del model.metadata_props[:]
        for prop in source.metadata_props:
            model.metadata_props.add(key=prop.key, value=prop.value)
        recipe = {
            "format": "QDQ",
            "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
            "activations": "uint8",
            "calibration_method": "minmax",
            "op_types": list(QUANTIZED_OP_TYPES),
            "calibration_images": len(batch),
            "float_nodes": len(exclude),
        }
        model.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(recipe, sort_keys=True))
        model.doc_string = (source.doc_string + " (int8)").strip()
    return save_model_atomic(model, out)
