"""On-device face recognition over an ONNX Runtime session: enroll, verify, identify.

::

    from device_sdk import Recognizer

    with Recognizer("model.onnx", store="gallery.db") as rec:
        rec.enroll("alice", ["alice1.jpg", "alice2.jpg"])         # aligned crops ...
        rec.enroll("bob", ["bob_holiday.jpg"], align=True)         # ... or photos (dlib detection)
        print(rec.identify("someone.jpg"))                       # Identification(person='alice', ...)
        print(rec.verify("someone.jpg", "bob"))                  # Verification(score=..., accepted=...)

**Model.** Any ONNX face-embedding model with one float NCHW input ``(N, 3, S, S)`` works
(:mod:`device_sdk.face_model`). Images are already-aligned face crops (file paths, PIL images or HxWx3
uint8 RGB arrays of any size, resized to the model's input), or ordinary photos with ``align=True``
(:mod:`device_sdk.face_images`).

**Gallery.** A local SQLite file (``store``, :mod:`device_sdk.gallery`) holds, per enrolled person, the
aligned crop of every enrolled image (PNG) and its embedding under the current model. Crops are kept so
that the gallery can be re-embedded when the model changes (:meth:`Recognizer.swap_model`, e.g. after a
federated round rebuilt the personalized model); opening a store with another model re-embeds it too.
The gallery, the crops and the embeddings never leave the device: nothing here opens a network
connection. The file is created readable by its owner only, and deletions overwrite freed pages
(``secure_delete``).

**Scores.** Each person's template is the normalised mean of their image embeddings; a score is the
cosine between a probe's embedding and a template. ``verify`` accepts when score >= threshold;
``identify`` returns the best-scoring person if their score reaches the threshold, else ``None``.

**Threshold.** Fixed when ``threshold=`` is given. Otherwise, for ``target_far``
(:mod:`device_sdk.threshold`): set on the model's stranger bank (public faces a ``facefl export
--threshold-set`` stores in the model) so that at most ``target_far`` of those strangers would be
identified as an enrolled person; without a bank (or with ``stranger_bank=False``), calibrated on pairs
of the device's own enrolled images, falling back to the model's ``facefl.default_threshold`` metadata
if present, else :data:`DEFAULT_THRESHOLD`, while the gallery is too small.
:attr:`Recognizer.threshold_info` says which one is in force. It is set again after every enroll, forget
and model swap.

**Threads.** Queries run concurrently (ONNX Runtime sessions are thread-safe) on an immutable snapshot of
(model session, gallery embeddings, threshold); enroll, forget and swap_model are serialised and publish a
new snapshot at once, so a query sees the old triple or the new one, never a mix.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from facefl.vectors import l2_normalize

from .errors import RecognizerError, UnknownPerson
from .face_images import FaceCrops, ImageInput
from .face_model import FaceModel
from .gallery import Gallery, decode_png
from .threshold import (
    CALIBRATION_MARGIN,
    DEFAULT_TARGET_FAR,
    DEFAULT_THRESHOLD,
    DEFAULT_THRESHOLD_KEY,
    Threshold,
    calibrate_threshold,
    open_set_threshold,
    threshold_for,
)

__all__ = [
    "CALIBRATION_MARGIN",
    "DEFAULT_TARGET_FAR",
    "DEFAULT_THRESHOLD",
    "DEFAULT_THRESHOLD_KEY",
    "Identification",
    "ImageInput",
    "Recognizer",
    "Threshold",
    "Verification",
    "calibrate_threshold",
    "open_set_threshold",
]


@dataclass(frozen=True)
class Verification:
    """Result of a 1:1 check of a probe image against one enrolled person."""

    person: str
    score: float  # cosine between the probe and the person's template
    accepted: bool  # score >= threshold
    threshold: float


@dataclass(frozen=True)
class Identification:
    """Result of a 1:N search; ``person`` is None when no one reaches the threshold."""

    person: str | None
    score: float  # best cosine over the enrolled people (-1.0 if none)
    threshold: float
    best_match: str | None  # the best-scoring person, even when rejected (None for an empty gallery)


@dataclass(frozen=True)
class _Snapshot:
    """Everything a query needs, swapped as one object (see the module docstring, Threads)."""

    model: FaceModel
    names: tuple[str, ...]  # enrolled people, sorted
    templates: np.ndarray  # (P, d) unit-norm templates, row k for names[k]
    threshold: Threshold


def _unknown(person: str, names: Sequence[str]) -> UnknownPerson:
    return UnknownPerson(f"{person!r} is not enrolled (enrolled: {', '.join(names) or 'no one'})")


class Recognizer:
    """Enroll people and recognise faces on the device with an ONNX model (see the module docstring).

    Args:
        model_path: an ONNX face-embedding model (NCHW float input).
        store: the SQLite gallery file (created if absent). It never leaves the device.
        threshold: a fixed cosine threshold; ``None`` sets it for ``target_far`` (module docstring).
        target_far: the false-accept rate the threshold aims at (default 1e-3).
        stranger_bank: set the threshold on the model's stranger bank when it has one (default True);
            False calibrates it on the gallery's own impostor pairs.
        threads: ONNX Runtime intra-op threads (``None``: its default).
        batch_size: images per inference call.
    """

    def __init__(
        self,
        model_path: str | Path,
        store: str | Path,
        *,
        threshold: float | None = None,
        target_far: float = DEFAULT_TARGET_FAR,
        stranger_bank: bool = True,
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        if threshold is not None and not -1.0 <= float(threshold) <= 1.0:
            raise RecognizerError(f"threshold must be a cosine in [-1, 1], got {threshold}")
        if not 0.0 < target_far < 1.0:
            raise RecognizerError(f"target_far must be in (0, 1), got {target_far}")
        if batch_size <= 0:
            raise RecognizerError(f"batch_size must be positive, got {batch_size}")
        self._fixed_threshold = None if threshold is None else float(threshold)
        self.target_far = float(target_far)
        self._use_stranger_bank = bool(stranger_bank)
        self._threads = threads
        self._batch_size = int(batch_size)
        self._write_lock = threading.RLock()  # enroll / forget / swap_model / close, and the gallery
        self._state_lock = threading.Lock()  # publishing a snapshot
        self._crops = FaceCrops()
        self._closed = False
        self.store_path = Path(store)
        model = self._open_model(Path(model_path))
        self._gallery = Gallery(self.store_path)
        try:
            with self._write_lock:
                stale = self._gallery.crop_rows(not_model=model.sha256)
                if stale:  # rows made by another model (the store was last used with an older one)
                    self._write_embeddings(model, stale)
                self._snapshot = self._build_snapshot(model)
        except BaseException:
            self._gallery.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Recognizer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the gallery file; further calls raise RecognizerError. Idempotent."""
        with self._write_lock:
            if not self._closed:
                self._closed = True
                self._gallery.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RecognizerError("the recognizer is closed")

    # ------------------------------------------------------------------ properties

    @property
    def model_path(self) -> Path:
        return self._snapshot.model.path

    @property
    def model_sha256(self) -> str:
        """SHA-256 of the model file in use (it changes with :meth:`swap_model`)."""
        return self._snapshot.model.sha256

    @property
    def image_size(self) -> int:
        return self._snapshot.model.image_size

    @property
    def threshold(self) -> float:
        return self._snapshot.threshold.value

    @property
    def threshold_info(self) -> Threshold:
        return self._snapshot.threshold

    def people(self) -> list[str]:
        """Enrolled people, sorted."""
        self._check_open()
        return list(self._snapshot.names)

    def image_count(self, person: str) -> int:
        """How many images of ``person`` are enrolled."""
        with self._write_lock:
            self._check_open()
            count = self._gallery.image_count(person)
        if count is None:
            raise _unknown(person, self.people())
        return count

    # ------------------------------------------------------------------ model and gallery

    def _open_model(self, path: Path) -> FaceModel:
        return FaceModel(path, batch_size=self._batch_size, threads=self._threads)

    def _write_embeddings(self, model: FaceModel, rows: list[tuple[int, bytes]]) -> None:
        """Re-embed the gallery rows (face id, PNG crop) with ``model``, then store them at once."""
        from tqdm import tqdm

        parts = []
        for lo in tqdm(
            range(0, len(rows), self._batch_size),
            desc="re-embedding gallery",
            unit="batch",
            disable=len(rows) <= 4 * self._batch_size,
        ):
            parts.append(model.embed([decode_png(r[1]) for r in rows[lo : lo + self._batch_size]]))
        self._gallery.set_embeddings([r[0] for r in rows], np.concatenate(parts), model.sha256)

    def _build_snapshot(self, model: FaceModel) -> _Snapshot:
        people, stored = self._gallery.embeddings(model.sha256)
        names = tuple(sorted(set(people)))
        index = {name: k for k, name in enumerate(names)}
        labels = np.array([index[p] for p in people], dtype=np.int64)
        if people:
            emb = l2_normalize(stored)
            templates = l2_normalize(np.stack([emb[labels == k].mean(axis=0) for k in range(len(names))]))
        else:
            emb = templates = np.zeros((0, 0), dtype=np.float32)
        threshold = threshold_for(
            emb,
            labels,
            fixed=self._fixed_threshold,
            target_far=self.target_far,
            model_default=model.default_threshold,
            templates=templates,
            strangers=model.stranger_bank if self._use_stranger_bank else None,
        )
        return _Snapshot(model, names, templates, threshold)

    def _publish(self, snapshot: _Snapshot) -> None:
        with self._state_lock:
            self._snapshot = snapshot

    def _current(self) -> _Snapshot:
        self._check_open()
        with self._state_lock:
            return self._snapshot

    # ------------------------------------------------------------------ enrollment

    def enroll(self, person: str, images: Sequence[ImageInput], *, align: bool = False) -> int:
        """Add images of ``person`` to the gallery (creating the person); returns their image count now.

        With ``align=True`` each image is a photo: its one face is detected and aligned, and only the
        aligned crop is stored. Nothing is stored if any image is unusable.
        """
        if not isinstance(person, str) or not person.strip():
            raise RecognizerError(f"person must be a non-empty name, got {person!r}")
        crops = self._crops(images, align)
        with self._write_lock:
            snap = self._current()
            self._gallery.add_faces(person, crops, snap.model.embed(crops), snap.model.sha256)
            self._publish(self._build_snapshot(snap.model))
        return self.image_count(person)

    def forget(self, person: str) -> None:
        """Delete ``person`` with all their crops and embeddings; UnknownPerson if not enrolled."""
        with self._write_lock:
            snap = self._current()
            if not self._gallery.delete_person(person):
                raise _unknown(person, snap.names)
            self._publish(self._build_snapshot(snap.model))

    # ------------------------------------------------------------------ queries

    def _probe_embeddings(self, snap: _Snapshot, images: Sequence[ImageInput], align: bool) -> np.ndarray:
        return snap.model.embed(self._crops(images, align))

    def verify(self, image: ImageInput, person: str, *, align: bool = False) -> Verification:
        """Is ``image`` the enrolled ``person``? UnknownPerson if they are not enrolled."""
        return self.verify_many([image], person, align=align)[0]

    def verify_many(
        self, images: Sequence[ImageInput], person: str, *, align: bool = False
    ) -> list[Verification]:
        """:meth:`verify` for several images of the same claimed person (one batched inference)."""
        snap = self._current()
        if person not in snap.names:
            raise _unknown(person, snap.names)
        scores = self._probe_embeddings(snap, images, align) @ snap.templates[snap.names.index(person)]
        t = snap.threshold.value
        return [Verification(person, float(s), bool(s >= t), t) for s in scores]

    def identify(self, image: ImageInput, *, align: bool = False) -> Identification:
        """Who is in ``image``: the best-matching enrolled person if they reach the threshold, else None."""
        return self.identify_many([image], align=align)[0]

    def identify_many(self, images: Sequence[ImageInput], *, align: bool = False) -> list[Identification]:
        """:meth:`identify` for several images (one batched inference)."""
        snap = self._current()
        probes = self._probe_embeddings(snap, images, align)
        t = snap.threshold.value
        if not snap.names:
            return [Identification(None, -1.0, t, None) for _ in range(len(probes))]
        scores = probes @ snap.templates.T
        best = scores.argmax(axis=1)
        out = []
        for row, k in zip(scores, best, strict=True):
            score = float(row[k])
            name = snap.names[int(k)]
            out.append(Identification(name if score >= t else None, score, t, name))
        return out

    def gallery_crops(self, limit: int | None = None) -> list[np.ndarray]:
        """Stored aligned crops (HxWx3 uint8), up to ``limit``, spread over people: for on-device
        calibration and parity checks of a new model. They must not leave the device."""
        with self._write_lock:
            self._check_open()
            return self._gallery.crops(limit)

    # ------------------------------------------------------------------ model swap

    def swap_model(self, model_path: str | Path) -> None:
        """Use another model: re-embed the gallery from the stored crops, then switch atomically.

        The new model is loaded and the whole gallery re-embedded before anything changes; if that fails
        the recognizer keeps its current model. Queries running meanwhile use the old model and gallery.
        """
        path = Path(model_path)
        with self._write_lock:
            self._check_open()
            model = self._open_model(path)
            rows = self._gallery.crop_rows()
            if rows:
                self._write_embeddings(model, rows)
            self._publish(self._build_snapshot(model))

    def __repr__(self) -> str:
        snap = self._snapshot
        return (
            f"Recognizer(model={str(snap.model.path)!r}, store={str(self.store_path)!r}, "
            f"people={len(snap.names)}, threshold={snap.threshold.value:.4f} ({snap.threshold.source}))"
        )
