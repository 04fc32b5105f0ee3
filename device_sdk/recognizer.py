"""On-device face recognition over an ONNX Runtime session: enroll, verify, identify.

::

    from device_sdk import Recognizer

    with Recognizer("model.onnx", store="gallery.db") as rec:
        rec.enroll("alice", ["alice1.jpg", "alice2.jpg"])         # aligned crops ...
        rec.enroll("bob", ["bob_holiday.jpg"], align=True)         # ... or photos (dlib detection)
        print(rec.identify("someone.jpg"))                       # Identification(person='alice', ...)
        print(rec.verify("someone.jpg", "bob"))                  # Verification(score=..., accepted=...)

**Model.** Any ONNX face-embedding model with one float NCHW input ``(N, 3, S, S)`` works. The input size
is read from the model; the preprocessing from its ``facefl.preprocessing`` metadata (written by
``facefl export``), else the default ``(x / 255 - 0.5) / 0.5`` on RGB (see :mod:`facefl.embedders`).
Images are already-aligned face crops (file paths, PIL images or HxWx3 uint8 RGB arrays of any size,
resized to the model's input), or ordinary photos with ``align=True`` (:mod:`device_sdk.align`).

**Gallery.** A local SQLite file (``store``) holds, per enrolled person, the aligned crop of every
enrolled image (PNG) and its embedding under the current model. Crops are kept so that the gallery can
be re-embedded when the model changes (:meth:`Recognizer.swap_model`, e.g. after a federated round
rebuilt the personalized model); opening a store with another model re-embeds it too. The gallery, the
crops and the embeddings never leave the device: nothing here opens a network connection. The file is
created readable by its owner only, and deletions overwrite freed pages (``secure_delete``).

**Scores.** Each person's template is the normalised mean of their image embeddings; a score is the
cosine between a probe's embedding and a template. ``verify`` accepts when score >= threshold;
``identify`` returns the best-scoring person if their score reaches the threshold, else ``None``.

**Threshold.** Fixed when ``threshold=`` is given. Otherwise calibrated on the device's own enrolled data
for ``target_far``: the impostor scores are the cosines between every pair of enrolled images of two
different people; with ``k = floor(target_far * n)`` of those ``n`` scores, the threshold lies between the
(k+1)-th highest score (rejected) and the k-th (accepted): in the middle of that gap, and at most
:data:`CALIBRATION_MARGIN` above the rejected one, so at most a ``target_far`` share would be accepted and
float noise between embedding paths cannot flip a pair. Image-to-image impostor scores have
heavier tails than the probe-to-template scores used at run time, so this errs on the safe side (fewer
false accepts). It needs at least ``ceil(1 / target_far)`` impostor pairs (e.g. 1,000 for 1e-3: five
people with ten images each give 1,000); with less data the threshold falls back to the model's
``facefl.default_threshold`` metadata if present, else :data:`DEFAULT_THRESHOLD`. :attr:`threshold_info`
says which one is in force. It is recalibrated after every enroll, forget and model swap.

**Threads.** Queries run concurrently (ONNX Runtime sessions are thread-safe) on an immutable snapshot of
(model session, gallery embeddings, threshold); enroll, forget and swap_model are serialised and publish a
new snapshot at once, so a query sees the old triple or the new one, never a mix.
"""

from __future__ import annotations

import io
import math
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from facefl.fileio import sha256_file
from facefl.vectors import l2_normalize

from .errors import RecognizerError, UnknownPerson

if TYPE_CHECKING:
    from facefl.embedders import OnnxEmbedder

    from .align import FaceAligner

__all__ = [
    "DEFAULT_TARGET_FAR",
    "DEFAULT_THRESHOLD",
    "Identification",
    "ImageInput",
    "Recognizer",
    "Threshold",
    "Verification",
]

#: Fallback cosine threshold when the model has no ``facefl.default_threshold`` and the gallery is too
#: small to calibrate one. A typical operating point of cosine-trained face models (CosFace/ArcFace
#: genuine pairs mostly score above it, impostors mostly below); calibrate or pass ``threshold=`` for
#: anything that matters.
DEFAULT_THRESHOLD = 0.5
DEFAULT_TARGET_FAR = 1e-3
#: How far above the highest rejected impostor score a calibrated threshold may sit (at most half the gap
#: to the next higher score): far above embedding float noise (~1e-6), far below a meaningful cosine step.
CALIBRATION_MARGIN = 1e-3
DEFAULT_THRESHOLD_KEY = "facefl.default_threshold"  # same key as export.onnx writes

ImageInput = str | Path | Image.Image | np.ndarray

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS people (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS faces (
    id INTEGER PRIMARY KEY,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    crop_png BLOB NOT NULL,
    embedding BLOB NOT NULL,
    model_sha256 TEXT NOT NULL,
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS faces_person ON faces(person_id);
"""


@dataclass(frozen=True)
class Threshold:
    """The decision threshold in force and where it came from."""

    value: float
    source: Literal["fixed", "calibrated", "model default", "default"]
    target_far: float
    impostor_pairs: int  # impostor scores available on the device's data


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

    embedder: OnnxEmbedder
    model_path: Path
    model_sha256: str
    names: tuple[str, ...]  # enrolled people, sorted
    templates: np.ndarray  # (P, d) unit-norm templates, row k for names[k]
    threshold: Threshold


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def calibrate_threshold(
    embeddings: np.ndarray,
    labels: np.ndarray,
    target_far: float,
    fallback: float,
    fallback_source: Literal["model default", "default"],
) -> Threshold:
    """The threshold for ``target_far`` from impostor pairs of (M, d) unit ``embeddings`` (module doc)."""
    labels = np.asarray(labels)
    if len(labels) > 1:
        scores = embeddings @ embeddings.T
        upper = np.triu(np.ones(scores.shape, dtype=bool), k=1)
        impostor = np.sort(scores[upper & (labels[:, None] != labels[None, :])])[::-1]
    else:
        impostor = np.zeros(0, dtype=np.float32)
    n = len(impostor)
    if n == 0 or n < math.ceil(1.0 / target_far):
        return Threshold(float(fallback), fallback_source, target_far, n)
    k = math.floor(target_far * n)  # accepting the k highest impostor scores keeps the share <= target_far
    # The threshold sits in the middle of the gap between the highest rejected score and the lowest
    # accepted one (k >= 1 because n >= 1 / target_far), so that the float noise of another embedding
    # path (batching, another runtime) cannot move a score across it.
    rejected, accepted = float(impostor[k]), float(impostor[k - 1])
    value = rejected + min((accepted - rejected) / 2, CALIBRATION_MARGIN)
    value = float(np.nextafter(np.float32(value), np.float32(np.inf)))  # accept iff score >= value
    return Threshold(value, "calibrated", target_far, n)


class Recognizer:
    """Enroll people and recognise faces on the device with an ONNX model (see the module docstring).

    Args:
        model_path: an ONNX face-embedding model (NCHW float input).
        store: the SQLite gallery file (created if absent). It never leaves the device.
        threshold: a fixed cosine threshold; ``None`` calibrates it on the gallery for ``target_far``.
        target_far: the false-accept rate the calibrated threshold aims at (default 1e-3).
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
        self._threads = threads
        self._batch_size = int(batch_size)
        self._write_lock = threading.RLock()  # enroll / forget / swap_model / close, and the DB
        self._state_lock = threading.Lock()  # publishing a snapshot
        self._aligner: FaceAligner | None = None
        self._closed = False
        self.store_path = Path(store)
        embedder, sha = self._open_model(Path(model_path))
        self._db = self._open_store(self.store_path)
        try:
            with self._write_lock:
                self._reembed_stale(embedder, sha)
                self._snapshot = self._build_snapshot(embedder, Path(model_path), sha)
        except BaseException:
            self._db.close()
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
                self._db.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RecognizerError("the recognizer is closed")

    # ------------------------------------------------------------------ properties

    @property
    def model_path(self) -> Path:
        return self._snapshot.model_path

    @property
    def model_sha256(self) -> str:
        """SHA-256 of the model file in use (it changes with :meth:`swap_model`)."""
        return self._snapshot.model_sha256

    @property
    def image_size(self) -> int:
        return self._snapshot.embedder.image_size

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
            row = self._db.execute(
                "SELECT COUNT(f.id) FROM people p LEFT JOIN faces f ON f.person_id = p.id WHERE p.name = ?"
                " GROUP BY p.id",
                (person,),
            ).fetchone()
        if row is None:
            enrolled = ", ".join(self.people()) or "no one"
            raise UnknownPerson(f"{person!r} is not enrolled (enrolled: {enrolled})")
        return int(row[0])

    # ------------------------------------------------------------------ model and store

    def _open_model(self, path: Path) -> tuple[OnnxEmbedder, str]:
        from facefl.data import DataError
        from facefl.embedders import OnnxEmbedder

        if not path.is_file():
            raise RecognizerError(f"model file {path} does not exist")
        try:
            embedder = OnnxEmbedder(path, batch_size=self._batch_size, threads=self._threads)
        except (DataError, ValueError) as exc:
            raise RecognizerError(f"cannot use {path} as a face-embedding model: {exc}") from exc
        return embedder, sha256_file(path)

    @staticmethod
    def _open_store(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # create it owner-only before SQLite opens it: the gallery holds biometric data
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA secure_delete = ON")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version not in (0, _SCHEMA_VERSION):
                db.close()
                raise RecognizerError(f"{path}: gallery schema version {version} is newer than this SDK")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise RecognizerError(f"{path} is not a usable gallery file: {exc}") from exc
        return db

    def _embed(self, embedder: OnnxEmbedder, crops: Sequence[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, 0), dtype=np.float32)
        step = embedder.batch_size  # ours, or the model's fixed batch dimension
        pre = embedder.preprocessing  # the model's own preprocessing (facefl.data.Preprocessing)
        parts = [
            embedder.embed_preprocessed(pre.batch(crops[lo : lo + step])) for lo in range(0, len(crops), step)
        ]
        return l2_normalize(np.concatenate(parts))

    def _reembed_stale(self, embedder: OnnxEmbedder, sha: str) -> None:
        """Re-embed rows made by another model (e.g. the store was last used with an older model)."""
        rows = self._db.execute("SELECT id, crop_png FROM faces WHERE model_sha256 != ?", (sha,)).fetchall()
        if rows:
            self._write_embeddings(embedder, sha, rows)

    def _write_embeddings(self, embedder: OnnxEmbedder, sha: str, rows: list[tuple[int, bytes]]) -> None:
        from tqdm import tqdm

        ids = [int(r[0]) for r in rows]
        parts = []
        for lo in tqdm(
            range(0, len(rows), self._batch_size),
            desc="re-embedding gallery",
            unit="batch",
            disable=len(rows) <= 4 * self._batch_size,
        ):
            parts.append(self._embed(embedder, [_unpng(r[1]) for r in rows[lo : lo + self._batch_size]]))
        emb = np.concatenate(parts)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "UPDATE faces SET embedding = ?, model_sha256 = ? WHERE id = ?",
                [(e.astype(np.float32).tobytes(), sha, i) for e, i in zip(emb, ids, strict=True)],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _build_snapshot(self, embedder: OnnxEmbedder, model_path: Path, sha: str) -> _Snapshot:
        rows = self._db.execute(
            "SELECT p.name, f.embedding FROM faces f JOIN people p ON p.id = f.person_id "
            "WHERE f.model_sha256 = ? ORDER BY p.name, f.id",
            (sha,),
        ).fetchall()
        names = tuple(sorted({str(r[0]) for r in rows}))
        index = {name: k for k, name in enumerate(names)}
        if rows:
            emb = l2_normalize(np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]))
            labels = np.array([index[str(r[0])] for r in rows], dtype=np.int64)
            templates = l2_normalize(np.stack([emb[labels == k].mean(axis=0) for k in range(len(names))]))
        else:
            emb = np.zeros((0, 0), dtype=np.float32)
            labels = np.zeros(0, dtype=np.int64)
            templates = np.zeros((0, 0), dtype=np.float32)
        if self._fixed_threshold is not None:
            threshold = Threshold(self._fixed_threshold, "fixed", self.target_far, 0)
        else:
            meta = embedder.metadata.get(DEFAULT_THRESHOLD_KEY)
            fallback, source = (float(meta), "model default") if meta else (DEFAULT_THRESHOLD, "default")
            threshold = calibrate_threshold(emb, labels, self.target_far, fallback, source)  # type: ignore[arg-type]
        return _Snapshot(embedder, model_path, sha, names, templates, threshold)

    def _publish(self, snapshot: _Snapshot) -> None:
        with self._state_lock:
            self._snapshot = snapshot

    def _current(self) -> _Snapshot:
        self._check_open()
        with self._state_lock:
            return self._snapshot

    # ------------------------------------------------------------------ images

    def _rgb(self, image: ImageInput, what: str) -> np.ndarray:
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

    def _crops(self, images: Sequence[ImageInput], align: bool) -> list[np.ndarray]:
        if isinstance(images, str | Path | Image.Image | np.ndarray) and not (
            isinstance(images, np.ndarray) and images.ndim == 4
        ):
            raise RecognizerError("expected a list of images; wrap a single image in a list")
        if len(images) == 0:
            raise RecognizerError("the image list is empty")
        crops = []
        for k, image in enumerate(images):
            what = f"image {k}" + (f" ({image})" if isinstance(image, str | Path) else "")
            rgb = self._rgb(image, what)
            crops.append(self._align(rgb, what) if align else rgb)
        return crops

    def _align(self, rgb: np.ndarray, what: str) -> np.ndarray:
        if self._aligner is None:
            from .align import FaceAligner

            self._aligner = FaceAligner()
        return self._aligner.align(rgb, what)

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
            emb = self._embed(snap.embedder, crops)
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO people (name, enrolled_at) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
                    (person, now),
                )
                (person_id,) = self._db.execute("SELECT id FROM people WHERE name = ?", (person,)).fetchone()
                self._db.executemany(
                    "INSERT INTO faces (person_id, crop_png, embedding, model_sha256, added_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [
                        (person_id, _png(crop), e.astype(np.float32).tobytes(), snap.model_sha256, now)
                        for crop, e in zip(crops, emb, strict=True)
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._publish(self._build_snapshot(snap.embedder, snap.model_path, snap.model_sha256))
        return self.image_count(person)

    def forget(self, person: str) -> None:
        """Delete ``person`` with all their crops and embeddings; UnknownPerson if not enrolled."""
        with self._write_lock:
            snap = self._current()
            cursor = self._db.execute("DELETE FROM people WHERE name = ?", (person,))
            if cursor.rowcount == 0:
                raise UnknownPerson(
                    f"{person!r} is not enrolled (enrolled: {', '.join(snap.names) or 'no one'})"
                )
            self._publish(self._build_snapshot(snap.embedder, snap.model_path, snap.model_sha256))

    # ------------------------------------------------------------------ queries

    def _probe_embeddings(self, snap: _Snapshot, images: Sequence[ImageInput], align: bool) -> np.ndarray:
        return self._embed(snap.embedder, self._crops(images, align))

    def verify(self, image: ImageInput, person: str, *, align: bool = False) -> Verification:
        """Is ``image`` the enrolled ``person``? UnknownPerson if they are not enrolled."""
        return self.verify_many([image], person, align=align)[0]

    def verify_many(
        self, images: Sequence[ImageInput], person: str, *, align: bool = False
    ) -> list[Verification]:
        """:meth:`verify` for several images of the same claimed person (one batched inference)."""
        snap = self._current()
        if person not in snap.names:
            raise UnknownPerson(f"{person!r} is not enrolled (enrolled: {', '.join(snap.names) or 'no one'})")
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
            rows = self._db.execute("SELECT crop_png FROM faces ORDER BY person_id, id").fetchall()
        if limit is not None and len(rows) > limit:
            rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
        return [_unpng(r[0]) for r in rows]

    # ------------------------------------------------------------------ model swap

    def swap_model(self, model_path: str | Path) -> None:
        """Use another model: re-embed the gallery from the stored crops, then switch atomically.

        The new model is loaded and the whole gallery re-embedded before anything changes; if that fails
        the recognizer keeps its current model. Queries running meanwhile use the old model and gallery.
        """
        path = Path(model_path)
        with self._write_lock:
            self._check_open()
            embedder, sha = self._open_model(path)
            rows = self._db.execute("SELECT id, crop_png FROM faces ORDER BY id").fetchall()
            if rows:
                self._write_embeddings(embedder, sha, rows)
            self._publish(self._build_snapshot(embedder, path, sha))

    def __repr__(self) -> str:
        snap = self._snapshot
        return (
            f"Recognizer(model={str(snap.model_path)!r}, store={str(self.store_path)!r}, "
            f"people={len(snap.names)}, threshold={snap.threshold.value:.4f} ({snap.threshold.source}))"
        )
