"""Reader for face datasets laid out as ``<root>/<identity>/<image file>``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


class DataError(ValueError):
    """A dataset on disk is missing, empty or unreadable."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array; DataError naming the file if it cannot."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # PIL decodes lazily: force it here so corrupt data fails inside this try
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # SyntaxError: some PIL plugins raise it for malformed headers.
        raise DataError(f"cannot read image {path}: {exc}") from exc


class ImageFolder:
    """Index of ``<root>/<identity>/<file>`` images; labels are indices into sorted identity names.

    Hidden entries (names starting with ".") and non-image files are ignored; an identity folder
    without any image is an error rather than silently dropped, because it usually means a broken copy.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"dataset directory {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"dataset path {self.root} is not a directory")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"dataset directory {self.root} has no identity sub-directories")
        self.identities: list[str] = [p.name for p in folders]
        self.samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            files = sorted(
                p
                for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise DataError(
                    f"identity directory {folder} contains no images "
                    f"(expected files ending in {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            self.samples.extend((path, label) for path in files)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 label of every sample, in ``samples`` order."""
        return np.fromiter((label for _, label in self.samples), dtype=np.int64, count=len(self.samples))

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Sample ``index`` as (HxWx3 uint8 RGB image, label)."""
        path, label = self.samples[index]
        return load_image(path), label

    def load_image(self, path: str | Path) -> np.ndarray:
        """Same as the module-level :func:`load_image` (kept on the class for convenience)."""
        return load_image(path)
