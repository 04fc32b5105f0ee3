"""What the recognizer accepts as images, turned into HxWx3 uint8 RGB face crops.

Images are already-aligned face crops (file paths, PIL images or HxWx3 uint8 RGB arrays of any size,
resized to the model's input later), or ordinary photos with ``align=True`` (:mod:`device_sdk.align`:
the one face is detected and aligned). Every refusal is a RecognizerError naming the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import RecognizerError

if TYPE_CHECKING:
    from .align import FaceAligner

__all__ = ["FaceCrops", "ImageInput", "to_rgb"]

ImageInput = str | Path | Image.Image | np.ndarray


def to_rgb(image: ImageInput, what: str) -> np.ndarray:
    """``image`` as an HxWx3 uint8 RGB array; ``what`` names it in errors."""
    from facefl.data import DataError, load_image

    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise RecognizerError(f"{what}: image file {path} does not exist")
        try:
            return load_image(path)
        except DataError as exc:
            raise RecognizerError(f"{what}: {path} is not a readable image file ({exc})") from exc
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise RecognizerError(f"{what}: expected a uint8 RGB array, got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise RecognizerError(f"{what}: expected an HxWx3 uint8 RGB array, got shape {image.shape}")
        return image
    raise RecognizerError(
        f"{what}: expected a file path, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}"
    )


class FaceCrops:
    """Turns a list of images into face crops; the face aligner (dlib) is loaded on first use."""

    def __init__(self) -> None:
        self._aligner: FaceAligner | None = None

    def __call__(self, images: Sequence[ImageInput], align: bool) -> list[np.ndarray]:
        if isinstance(images, str | Path | Image.Image | np.ndarray) and not (
            isinstance(images, np.ndarray) and images.ndim == 4
        ):
            raise RecognizerError("expected a list of images; wrap a single image in a list")
        if len(images) == 0:
            raise RecognizerError("the image list is empty")
        crops = []
        for k, image in enumerate(images):
            what = f"image {k}" + (f" ({image})" if isinstance(image, str | Path) else "")
            rgb = to_rgb(image, what)
            crops.append(self._align(rgb, what) if align else rgb)
        return crops

    def _align(self, rgb: np.ndarray, what: str) -> np.ndarray:
        if self._aligner is None:
            from .align import FaceAligner

            self._aligner = FaceAligner()
        return self._aligner.align(rgb, what)
