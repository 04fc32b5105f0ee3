"""The one definition of image preprocessing, shared by training, ONNX export and inference.

A model is only as good as the agreement between how it was trained and how it is fed, so every path
(device training, server evaluation, exported-model metadata, SDK inference) goes through
:class:`Preprocessing`, and exported models record :meth:`Preprocessing.to_dict` so a runtime in another
language can reproduce it exactly:

    1. decode to 8-bit RGB (PIL images of any mode are converted to RGB);
    2. resize to ``image_size`` x ``image_size`` with bilinear interpolation (PIL, which antialiases on
       downscaling) when the size differs -- the whole image is resized, no crop (inputs are expected to
       be face crops already);
    3. ``x = (pixel / 255 - mean) / std`` in float32; ``mean`` and ``std`` are each one number for all
       three channels or a per-channel ``[R, G, B]`` triple (always in RGB order, applied before step 4);
    4. channels-first (3, S, S), channel order ``colour`` ("RGB" or "BGR").

Each backbone has its own (``facefl.models.Architecture.preprocessing``, :func:`preprocessing_for`): facefl's
own ``(x / 255 - 0.5) / 0.5``, or, for an imported network, the normalisation it was trained with.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray
#: One value for the three channels, or one per channel in RGB order.
ChannelValue = float | tuple[float, float, float]

_COLOURS = ("RGB", "BGR")


def _channel_value(name: str, value: Any) -> ChannelValue:
    """A plain float, or a 3-tuple of floats for per-channel values (lists from JSON metadata included)."""
    try:
        if np.ndim(value) == 0:
            return float(value)
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or three numbers, got {value!r}") from None
    if len(values) != 3:
        raise ValueError(f"{name} must be a number or three numbers (R, G, B), got {len(values)}")
    return (values[0], values[1], values[2])


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: ChannelValue = 0.5
    std: ChannelValue = 0.5
    colour: str = "RGB"

    def __post_init__(self) -> None:
        try:  # accept any integer type (e.g. numpy ints from metadata), store a plain int
            size = operator.index(self.image_size)
        except TypeError:
            raise ValueError(f"image_size must be an integer, got {self.image_size!r}") from None
        if isinstance(self.image_size, bool) or size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)  # frozen dataclass: normalise in place once
        object.__setattr__(self, "mean", _channel_value("mean", self.mean))
        object.__setattr__(self, "std", _channel_value("std", self.std))
        if not np.all(np.asarray(self.std) > 0):
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.colour not in _COLOURS:
            raise ValueError(f"colour must be one of {_COLOURS}, got {self.colour!r}")

    def to_uint8(self, image: ImageLike) -> np.ndarray:
        """Steps 1-2: an (S, S, 3) uint8 RGB array (validated and resized as needed)."""
        if isinstance(image, Image.Image):
            pil = image if image.mode == "RGB" else image.convert("RGB")
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an HxWx3 RGB array, got shape {image.shape}")
            if image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 image array, got dtype {image.dtype}")
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise ValueError(f"image has no pixels: shape {image.shape}")
            if image.shape[:2] == (self.image_size, self.image_size):
                return image
            pil = Image.fromarray(np.ascontiguousarray(image))
        else:
            raise ValueError(f"expected a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
        if pil.size != (self.image_size, self.image_size):
            pil = pil.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return np.asarray(pil, dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """Steps 3-4 on uint8 (..., S, S, 3) arrays: float32 (..., 3, S, S)."""
        # Fixed float32 operation order, so that a single image and a batch give bit-identical values.
        x = pixels.astype(np.float32)
        x /= np.float32(255.0)
        x -= np.asarray(self.mean, np.float32)  # (3,) broadcasts over the trailing RGB axis
        x /= np.asarray(self.std, np.float32)
        if self.colour == "BGR":
            x = x[..., ::-1]
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))

    def __call__(self, image: ImageLike) -> np.ndarray:
        """One image (PIL or HxWx3 uint8 RGB, any size) -> float32 (3, S, S)."""
        return self.normalize(self.to_uint8(image))

    def batch(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Several images -> float32 (N, 3, S, S). Accepts a sequence or an (N, H, W, 3) uint8 array."""
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise ValueError(f"expected an (N, H, W, 3) uint8 array, got shape {images.shape}")
            if images.shape[1:] == (self.image_size, self.image_size, 3) and images.dtype == np.uint8:
                return self.normalize(images)  # fast path: already the right size
        if len(images) == 0:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        return self.normalize(np.stack([self.to_uint8(image) for image in images]))

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float32 (3,) arrays in the output channel order (``colour``), for code that
        works on normalised tensors (augmentation undoes and redoes the normalisation)."""
        mean = np.broadcast_to(np.asarray(self.mean, np.float32), (3,))
        std = np.broadcast_to(np.asarray(self.std, np.float32), (3,))
        if self.colour == "BGR":
            mean, std = mean[::-1], std[::-1]
        return np.array(mean), np.array(std)

    def to_dict(self) -> dict[str, Any]:
        """Metadata for exported models and reports; :meth:`from_dict` inverts it."""
        data = asdict(self)
        for key in ("mean", "std"):  # per-channel values as JSON lists [R, G, B]
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return {**data, "resize": "bilinear", "layout": "NCHW", "formula": "(x / 255 - mean) / std"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(data["image_size"]),
            mean=_channel_value("mean", data.get("mean", 0.5)),
            std=_channel_value("std", data.get("std", 0.5)),
            colour=str(data.get("colour", "RGB")),
        )


def preprocessing_for(architecture: str) -> Preprocessing:
    """The preprocessing a registered backbone was built for (its input size and normalisation)."""
    from facefl.models import get_architecture  # local import: facefl.data must not require torch

    return get_architecture(architecture).preprocessing
