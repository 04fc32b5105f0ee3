"""The generic and the personalized face model to one self-contained ONNX file.

The exported graph maps float32 ``(N, 3, S, S)`` images, preprocessed by :class:`facefl.data.Preprocessing`
(its JSON is stored in ``metadata_props`` under :data:`facefl.embedders.PREPROCESSING_METADATA_KEY`), to
``(N, d)`` L2-normalised embeddings; the batch axis is dynamic. Weights are stored inside the file (no
external data), so the one file is the whole model.

- generic: a facefl checkpoint (:func:`facefl.checkpoint.load_checkpoint`);
- personalized (FedFR, docs/architecture.md "Algorithms"): a device state directory holding
  ``personalized.safetensors`` (a facefl checkpoint of the device's backbone after local training) and
  ``dfc.safetensors`` (plain safetensors with at least ``converter.weight`` (d, d) and
  ``converter.bias`` (d,); any other tensors, such as the binary classifiers, are ignored), read by
  :class:`facefl.device_state.DeviceState`.
  Embedding = L2-normalise(converter(backbone(x))).

The personalized model (it embeds the DFC converter) is device-private: export it on the device and never
upload it.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from export.errors import ExportError
from facefl.data import Preprocessing
from facefl.device_state import DFC_FILE, PERSONALIZED_FILE, DeviceState, DeviceStateError
from facefl.embedders import PREPROCESSING_METADATA_KEY
from facefl.fileio import atomic_write, sha256_file
from facefl.models.embedding_graph import EmbeddingGraph

__all__ = [
    "DFC_FILE",
    "PERSONALIZED_FILE",
    "EmbeddingGraph",
    "ExportSource",
    "export_onnx",
    "graph_op_types",
    "load_generic",
    "load_personalized",
    "save_model_atomic",
]

#: Files of a device state directory that make up the personalized model: PERSONALIZED_FILE and
#: DFC_FILE, FedFR's personal state (facefl.device_state owns the folder).

#: metadata_props keys written besides the preprocessing (all values are strings).
KIND_KEY = "facefl.kind"  # "generic" | "personalized"
ARCHITECTURE_KEY = "facefl.architecture"
EMBEDDING_DIM_KEY = "facefl.embedding_dim"
SOURCE_SHA256_KEY = "facefl.source_sha256"
DEFAULT_THRESHOLD_KEY = "facefl.default_threshold"

DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportSource:
    """A model ready to export: the module (eval mode), its preprocessing and provenance metadata."""

    module: EmbeddingGraph
    preprocessing: Preprocessing
    architecture: str
    embedding_dim: int
    kind: str  # "generic" or "personalized"
    metadata: dict[str, str] = field(default_factory=dict)


def _load_backbone(path: Path) -> tuple[nn.Module, Preprocessing, str, int]:
    from facefl.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
        return build_from_checkpoint(ckpt), ckpt.preprocessing, ckpt.architecture, ckpt.embedding_dim
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc


def load_generic(checkpoint: str | Path) -> ExportSource:
    """The generic model of a facefl checkpoint file."""
    path = Path(checkpoint)
    backbone, preprocessing, architecture, dim = _load_backbone(path)
    return ExportSource(
        module=EmbeddingGraph(backbone).eval(),
        preprocessing=preprocessing,
        architecture=architecture,
        embedding_dim=dim,
        kind="generic",
        metadata={SOURCE_SHA256_KEY: sha256_file(path)},
    )


def load_personalized(state_dir: str | Path) -> ExportSource:
    """The personalized model of a device state directory (see the module docstring for its files)."""
    try:
        model = DeviceState(state_dir).personalized_model()
    except DeviceStateError as exc:
        raise ExportError(str(exc)) from exc
    return ExportSource(
        module=model.module,
        preprocessing=model.preprocessing,
        architecture=model.architecture,
        embedding_dim=model.embedding_dim,
        kind="personalized",
        metadata={SOURCE_SHA256_KEY: model.sha256},
    )


def save_model_atomic(model: object, out: Path) -> Path:
    """Write an ``onnx.ModelProto`` to ``out`` as one self-contained file, atomically (temp file + rename)."""
    import onnx

    return atomic_write(out, lambda tmp: onnx.save_model(model, tmp, save_as_external_data=False))  # type: ignore[arg-type]


def graph_op_types(model: str | Path) -> set[str]:
    """The operator types of an ONNX file's main graph."""
    import onnx

    return {node.op_type for node in onnx.load(str(model), load_external_data=False).graph.node}


def export_onnx(
    source: ExportSource,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    default_threshold: float | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``source`` as a single ONNX file at ``out`` (atomically); returns the path.

    Input ``images`` (N, 3, S, S) float32, output ``embeddings`` (N, d) float32 unit vectors, N dynamic.
    ``default_threshold`` (a cosine) is stored for runtimes that cannot calibrate one on their own data.
    The graph is checked (``onnx.checker``) and must not contain ``PRelu`` nodes (facefl's backbones write
    PReLU as Relu/Mul/Sub, which every runtime handles well).
    """
    import onnx

    out = Path(out)
    size = source.preprocessing.image_size
    metadata = {
        PREPROCESSING_METADATA_KEY: json.dumps(source.preprocessing.to_dict(), sort_keys=True),
        KIND_KEY: source.kind,
        ARCHITECTURE_KEY: source.architecture,
        EMBEDDING_DIM_KEY: str(source.embedding_dim),
        **source.metadata,
        **dict(extra_metadata or {}),
    }
    if default_threshold is not None:
        if not -1.0 <= default_threshold <= 1.0:
            raise ExportError(f"default threshold must be a cosine in [-1, 1], got {default_threshold}")
        metadata[DEFAULT_THRESHOLD_KEY] = repr(float(default_threshold))
    module = source.module.eval()
    with tempfile.TemporaryDirectory(prefix="facefl-export-") as work:
        tmp = Path(work) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is legacy
            # The TorchScript exporter (dynamo=False) writes plain ops for FastPReLU's decomposition and
            # needs no extra dependencies; batch 2 in the example input keeps shapes from folding to 1.
            torch.onnx.export(
                module,
                (torch.zeros(2, 3, size, size),),
                str(tmp),
                dynamo=False,
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        model = onnx.load(str(tmp))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "facefl"
    model.doc_string = (
        f"facefl {source.kind} face-embedding model ({source.architecture}, d={source.embedding_dim})"
    )
    onnx.checker.check_model(model, full_check=True)
    prelu = [n.name for n in model.graph.node if n.op_type == "PRelu"]
    if prelu:
        raise ExportError(f"exported graph has PRelu nodes {prelu[:3]}; expected Relu/Mul/Sub (FastPReLU)")
    return save_model_atomic(model, out)


def set_metadata(path: str | Path, items: Mapping[str, str]) -> Path:
    """Add or replace ``metadata_props`` entries of the ONNX model at ``path`` (atomically)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in items]
    del model.metadata_props[:]
    for key, value in [*kept, *items.items()]:
        model.metadata_props.add(key=key, value=value)
    return save_model_atomic(model, path)
