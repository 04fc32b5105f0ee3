"""The recognizer's gallery: a local SQLite file of enrolled people, their aligned crops and embeddings.

Per enrolled person, the file holds the aligned crop of every enrolled image (PNG) and its embedding
under the model that made it (``model_sha256``). Crops are kept so that the gallery can be re-embedded
when the model changes. The file never leaves the device: nothing here opens a network connection. It is
created readable by its owner only, and deletions overwrite freed pages (``secure_delete``).

:class:`Gallery` is not thread-safe: its owner (:class:`device_sdk.Recognizer`) serialises writers.
"""

from __future__ import annotations

import io
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import RecognizerError

__all__ = ["Gallery", "decode_png", "encode_png"]

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


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


class Gallery:
    """The SQLite gallery at ``path`` (created owner-only if absent); RecognizerError when the file is
    not a gallery or was written by a newer SDK."""

    def __init__(self, path: Path) -> None:
        self.path = path
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
        self._db = db

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ reads

    def image_count(self, person: str) -> int | None:
        """How many images of ``person`` are stored (None: not enrolled)."""
        row = self._db.execute(
            "SELECT COUNT(f.id) FROM people p LEFT JOIN faces f ON f.person_id = p.id WHERE p.name = ?"
            " GROUP BY p.id",
            (person,),
        ).fetchone()
        return None if row is None else int(row[0])

    def embeddings(self, model_sha256: str) -> tuple[list[str], np.ndarray]:
        """(person of each row, (M, d) float32 embeddings) of the faces embedded by that model, ordered
        by person name then enrolment; ``(0, 0)`` embeddings when there are none."""
        rows = self._db.execute(
            "SELECT p.name, f.embedding FROM faces f JOIN people p ON p.id = f.person_id "
            "WHERE f.model_sha256 = ? ORDER BY p.name, f.id",
            (model_sha256,),
        ).fetchall()
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        return [str(r[0]) for r in rows], np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])

    def crop_rows(self, *, not_model: str | None = None) -> list[tuple[int, bytes]]:
        """(face id, PNG crop) of every face, or of those embedded by another model than ``not_model``."""
        if not_model is None:
            return [(int(i), c) for i, c in self._db.execute("SELECT id, crop_png FROM faces ORDER BY id")]
        rows = self._db.execute("SELECT id, crop_png FROM faces WHERE model_sha256 != ?", (not_model,))
        return [(int(i), c) for i, c in rows]

    def crops(self, limit: int | None = None) -> list[np.ndarray]:
        """Stored crops, up to ``limit``, spread evenly over the faces ordered by person."""
        rows = self._db.execute("SELECT crop_png FROM faces ORDER BY person_id, id").fetchall()
        if limit is not None and len(rows) > limit:
            rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
        return [decode_png(r[0]) for r in rows]

    # ------------------------------------------------------------------ writes (one transaction each)

    def add_faces(
        self, person: str, crops: Sequence[np.ndarray], embeddings: np.ndarray, model_sha256: str
    ) -> None:
        """Store ``crops`` of ``person`` (created if new) with their embeddings, all or nothing."""
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
                    (person_id, encode_png(crop), e.astype(np.float32).tobytes(), model_sha256, now)
                    for crop, e in zip(crops, embeddings, strict=True)
                ],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def set_embeddings(self, ids: Sequence[int], embeddings: np.ndarray, model_sha256: str) -> None:
        """Replace the embeddings of the faces ``ids`` (made by ``model_sha256``), all or nothing."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "UPDATE faces SET embedding = ?, model_sha256 = ? WHERE id = ?",
                [
                    (e.astype(np.float32).tobytes(), model_sha256, i)
                    for e, i in zip(embeddings, ids, strict=True)
                ],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def delete_person(self, person: str) -> bool:
        """Delete ``person`` with all their faces; False when not enrolled."""
        return self._db.execute("DELETE FROM people WHERE name = ?", (person,)).rowcount > 0
