"""Images for calibration and parity checks: every image file under a directory, at the model's size.

Any directory works: an image folder (``<identity>/<file>``) such as a device's own enrolled faces, or a
flat directory of crops. Files are decoded with :func:`facefl.data.load_image` and resized with
:class:`facefl.data.Preprocessing` (the one preprocessing definition).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.errors import ExportError
from facefl.data import IMAGE_EXTENSIONS, DataError, Preprocessing, load_image


def image_files(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, hidden entries skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise ExportError(f"image directory {root} does not exist or is not a directory")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ExportError(
            f"image directory {root} holds no images (files ending in {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return files


def load_image_dir(root: str | Path, image_size: int, limit: int | None = None) -> np.ndarray:
    """(N, S, S, 3) uint8 RGB images from ``root``; at most ``limit``, spread evenly over the sorted files.

    Spreading (rather than taking the first ``limit``) keeps every identity of an image folder represented
    in a calibration set.
    """
    files = image_files(root)
    if limit is not None:
        if limit <= 0:
            raise ExportError(f"image limit must be positive, got {limit}")
        if len(files) > limit:
            picks = np.linspace(0, len(files) - 1, limit).round().astype(int)
            files = [files[i] for i in picks]
    preprocessing = Preprocessing(image_size)
    try:
        return np.stack([preprocessing.to_uint8(load_image(f)) for f in files])
    except DataError as exc:
        raise ExportError(str(exc)) from exc
