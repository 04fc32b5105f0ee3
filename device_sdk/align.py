"""Face detection and alignment of ordinary photos: the one definition, shared by the SDK and tools.

A photo becomes an aligned face crop exactly the way the benchmark data (``../shared/data``) was made:
dlib's HOG frontal face detector, dlib's 5-point landmark model (``shape_predictor_5_face_landmarks.dat``
from the PyPI package ``face_recognition_models``, CC0; installed locally, never downloaded at run time)
and ``dlib.get_face_chip(image, shape, size=112, padding=0.25)``.

A photo with no face raises :class:`~device_sdk.errors.NoFaceFound`; one with several faces raises
:class:`~device_sdk.errors.MultipleFaces`: the aligner never guesses which face is meant.

Optional dependencies: ``pip install 'facefl[detect]'`` (dlib, face_recognition_models).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MultipleFaces, NoFaceFound, RecognizerError

__all__ = ["CROP_PADDING", "CROP_SIZE", "FaceAligner", "detection_available", "landmark_model_path"]

CROP_SIZE = 112
CROP_PADDING = 0.25

_INSTALL_HINT = "face detection needs dlib and face_recognition_models: pip install 'facefl[detect]'"


_LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"


def landmark_model_path() -> Path | None:
    """The 5-point landmark model installed by ``face_recognition_models``, or None.

    Located without importing that package: its ``__init__`` needs ``pkg_resources``, which recent
    setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "models" / _LANDMARK_MODEL
        if path.is_file():
            return path
    return None


def detection_available() -> bool:
    """Whether dlib and the landmark model are installed (``align=True`` works)."""
    return importlib.util.find_spec("dlib") is not None and landmark_model_path() is not None


class FaceAligner:
    """Detects the single face of an RGB photo and returns its aligned ``size`` x ``size`` crop.

    ``upsample``: how many times dlib upsamples the photo before detecting (1 finds faces down to about
    40 px; more finds smaller faces, slower). Thread-safe (calls are serialised: dlib objects are not
    documented as safe to share between threads).
    """

    def __init__(
        self,
        size: int = CROP_SIZE,
        padding: float = CROP_PADDING,
        upsample: int = 1,
        predictor_path: str | Path | None = None,
    ) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise RecognizerError(_INSTALL_HINT) from exc
        if predictor_path is None:
            predictor_path = landmark_model_path()
            if predictor_path is None:
                raise RecognizerError(_INSTALL_HINT)
        if not Path(predictor_path).is_file():
            raise RecognizerError(f"landmark model {predictor_path} does not exist")
        if size <= 0 or upsample < 0 or padding < 0:
            raise ValueError(f"bad aligner settings: size={size}, padding={padding}, upsample={upsample}")
        self._dlib: Any = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor_path))
        self.size = int(size)
        self.padding = float(padding)
        self.upsample = int(upsample)
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (left, top, right, bottom) in an (H, W, 3) uint8 RGB image."""
        with self._lock:
            return [(r.left(), r.top(), r.right(), r.bottom()) for r in self._detector(image, self.upsample)]

    def align(self, image: np.ndarray, what: str = "photo") -> np.ndarray:
        """The aligned (size, size, 3) uint8 RGB crop of the one face in ``image`` (``what``: for errors)."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        with self._lock:
            faces = self._detector(image, self.upsample)
            if len(faces) == 0:
                raise NoFaceFound(f"no face found in {what}")
            if len(faces) > 1:
                boxes = ", ".join(f"({r.left()},{r.top()})-({r.right()},{r.bottom()})" for r in faces)
                raise MultipleFaces(
                    f"{len(faces)} faces found in {what} at {boxes}; give a photo with one face or an "
                    "aligned crop"
                )
            shape = self._predictor(image, faces[0])
            chip = self._dlib.get_face_chip(image, shape, size=self.size, padding=self.padding)
        return np.ascontiguousarray(chip, dtype=np.uint8)
