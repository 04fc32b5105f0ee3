"""The one way to turn face images into embeddings, for evaluation and on-device inference.

An :class:`Embedder` maps images -- an ``(N, H, W, 3)`` uint8 RGB array or a list of image files -- to
``(N, d)`` float32 L2-normalised embeddings. Every implementation preprocesses through
:class:`facefl.data.Preprocessing` (the single definition), so a PyTorch model and its ONNX export fed the
same images give the same embeddings.

- :class:`TorchEmbedder`: a facefl backbone (or a checkpoint) in PyTorch.
- :class:`OnnxEmbedder`: any ONNX face-embedding model with an NCHW float input, on ONNX Runtime (CPU).
  Its preprocessing is read from the model's ``metadata_props`` key ``facefl.preprocessing`` (JSON of
  ``Preprocessing.to_dict()``) when present; otherwise ``(x / 255 - 0.5) / 0.5`` RGB at the model's
  input size.
- :func:`load_embedder`: dispatches on the file (``.onnx`` or a facefl checkpoint).

``flip=True`` averages the embeddings of each image and of its horizontal mirror, then re-normalises
(a common test-time augmentation for face verification).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from facefl.data.folder import load_image
from facefl.data.preprocess import Preprocessing
from facefl.vectors import l2_normalize

#: ONNX ``metadata_props`` key holding the JSON of :meth:`Preprocessing.to_dict` (written by facefl's export).
PREPROCESSING_METADATA_KEY = "facefl.preprocessing"

Images = np.ndarray | Sequence[str | Path]


@runtime_checkable
class Embedder(Protocol):
    """Images -> (N, d) float32 unit-norm embeddings."""

    image_size: int

    def embed(self, images: Images) -> np.ndarray: ...


def iter_batches(images: Images, preprocessing: Preprocessing, batch_size: int) -> Iterator[np.ndarray]:
    """Preprocessed float32 (B, 3, S, S) batches of ``images`` (files are decoded one batch at a time)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected an (N, H, W, 3) uint8 array, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got dtype {images.dtype}")
        for lo in range(0, len(images), batch_size):
            yield preprocessing.batch(images[lo : lo + batch_size])
        return
    if isinstance(images, str | Path):
        raise TypeError("expected a list of image paths or an image array, got a single path")
    items = list(images)
    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        decoded = [load_image(item) if isinstance(item, str | Path) else item for item in chunk]
        yield preprocessing.batch(decoded)


class TorchEmbedder:
    """A facefl backbone in PyTorch (eval mode, no gradients)."""

    def __init__(
        self,
        model: Any,
        architecture: str,
        device: str | None = None,
        batch_size: int = 128,
        flip: bool = False,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        import torch

        from facefl.data.preprocess import preprocessing_for

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.architecture = architecture
        self.preprocessing = preprocessing or preprocessing_for(architecture)
        self.image_size = self.preprocessing.image_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.flip = bool(flip)
        self.embedding_dim = int(getattr(model, "embedding_dim", 0)) or None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | None = None, batch_size: int = 128, flip: bool = False
    ) -> TorchEmbedder:
        from facefl.checkpoint import build_from_checkpoint, load_checkpoint

        ckpt = load_checkpoint(path)
        return cls(
            build_from_checkpoint(ckpt),
            ckpt.architecture,
            device=device,
            batch_size=batch_size,
            flip=flip,
            preprocessing=ckpt.preprocessing,
        )

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """Float32 (B, 3, S, S) already-preprocessed images -> (B, d) unit-norm embeddings."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            emb = self.model(x)
            if self.flip:
                emb = emb + self.model(torch.flip(x, dims=[3]))
            out = emb.float().cpu().numpy()
        return l2_normalize(out)

    def embed(self, images: Images) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [
                self.embed_preprocessed(b) for b in iter_batches(images, self.preprocessing, self.batch_size)
            ]
        finally:
            self.model.train(was_training)
        if not parts:
            return np.zeros((0, self.embedding_dim or 0), dtype=np.float32)
        return np.concatenate(parts)


class OnnxEmbedder:
    """Any ONNX face-embedding model with an NCHW float input, on an ONNX Runtime CPU session."""

    def __init__(
        self,
        path: str | Path,
        flip: bool = False,
        batch_size: int = 64,
        preprocessing: Preprocessing | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        from facefl.data.folder import DataError

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"ONNX model {self.path} does not exist")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise DataError(f"cannot load ONNX model {self.path}: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input (the image batch), found {len(inputs)}")
        self.input_name = inputs[0].name
        shape = list(inputs[0].shape)
        if inputs[0].type != "tensor(float)":
            raise ValueError(
                f"{self.path}: input {self.input_name!r} has type {inputs[0].type}, need float32"
            )
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(
                f"{self.path}: input {self.input_name!r} has shape {shape}; OnnxEmbedder needs NCHW input "
                "(N, 3, S, S) -- channels-last (NHWC) or other layouts are not supported"
            )
        metadata = self.session.get_modelmeta().custom_metadata_map
        if preprocessing is None and PREPROCESSING_METADATA_KEY in metadata:
            try:
                preprocessing = Preprocessing.from_dict(json.loads(metadata[PREPROCESSING_METADATA_KEY]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.path}: bad {PREPROCESSING_METADATA_KEY} metadata: {exc}") from exc
        h, w = shape[2], shape[3]
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise ValueError(f"{self.path}: input is {h}x{w}; only square inputs are supported")
            if preprocessing is None:
                preprocessing = Preprocessing(image_size=h)
            elif preprocessing.image_size != h:
                raise ValueError(
                    f"{self.path}: preprocessing image_size {preprocessing.image_size} != model input {h}"
                )
        elif preprocessing is None:
            raise ValueError(
                f"{self.path}: input spatial size {shape[2:]} is not fixed and the model carries no "
                f"{PREPROCESSING_METADATA_KEY!r} metadata; pass preprocessing=Preprocessing(image_size=...)"
            )
        self.preprocessing = preprocessing
        self.image_size = preprocessing.image_size
        # a fixed batch dimension (e.g. 1) is honoured by running exactly that many images at a time
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.batch_size = self.fixed_batch or int(batch_size)
        self.flip = bool(flip)
        self.metadata = dict(metadata)

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if self.fixed_batch is not None and n < self.fixed_batch:
            pad = np.zeros((self.fixed_batch - n, *x.shape[1:]), dtype=np.float32)
            x = np.concatenate([x, pad])
        out = np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)
        return out.reshape(out.shape[0], -1)[:n]

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        emb = self._run(x)
        if self.flip:
            emb = emb + self._run(np.ascontiguousarray(x[..., ::-1]))
        return l2_normalize(emb)

    def embed(self, images: Images) -> np.ndarray:
        parts = [
            self.embed_preprocessed(b) for b in iter_batches(images, self.preprocessing, self.batch_size)
        ]
        if not parts:
            dim = self.session.get_outputs()[0].shape[-1]
            return np.zeros((0, dim if isinstance(dim, int) else 0), dtype=np.float32)
        return np.concatenate(parts)


def load_embedder(path: str | Path, flip: bool = False, **kwargs: Any) -> TorchEmbedder | OnnxEmbedder:
    """An embedder for a model file: ``.onnx`` -> :class:`OnnxEmbedder`, else a facefl checkpoint."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxEmbedder(path, flip=flip, **kwargs)
    return TorchEmbedder.from_checkpoint(path, flip=flip, **kwargs)
