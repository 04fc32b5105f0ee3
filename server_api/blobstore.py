"""Blob store on the filesystem, keyed by 64 hex digits: the sha256 of the content (model versions, packs,
masked updates), or a random name (plain updates: server_api.services.intake). S3 could implement the
same API."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Protocol

from facefl.fileio import sha256_file


class BlobStore(Protocol):
    def staging_file(self) -> Path: ...
    def put_file(self, staged: Path) -> tuple[str, int]: ...
    def adopt(self, staged: Path, key: str) -> None: ...
    def put_bytes(self, data: bytes) -> tuple[str, int]: ...
    def path(self, key: str) -> Path: ...
    def read(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobStore:
    """root/ab/cd/<sha256>; writes go to a staging folder and are renamed into place after fsync.

    Each store (one per worker process) stages in its own folder root/staging/<id>/ and holds an
    exclusive lock on root/staging/<id>.lock while it lives. A process that dies (kill -9 included)
    releases its lock, so the next store to start removes that folder and whatever half-written files
    it held; the folders of live workers (locked) are left alone.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging_root = self.root / "staging"
        self.staging_root.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        # locked before it gets the name sweepers look for: they never see an unlocked live lock
        pending = self.staging_root / f"{name}.pending"
        self._lock_file = pending.open("wb")
        fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_path = pending.rename(self.staging_root / f"{name}.lock")
        self._staging = self.staging_root / name
        self._staging.mkdir()
        self.swept = self.sweep_staging()

    def sweep_staging(self) -> int:
        """Remove what dead processes left in the staging area; returns the number of files removed."""
        removed = 0
        for entry in self.staging_root.iterdir():
            if entry in (self._staging, self._lock_path):
                continue
            if entry.suffix == ".lock":
                removed += self._sweep_owner(entry)
            elif entry.suffix == ".part" and entry.is_file():
                entry.unlink(missing_ok=True)  # the staging layout before per-process folders
                removed += 1
        return removed

    def _sweep_owner(self, lock: Path) -> int:
        try:
            f = lock.open("rb")
        except FileNotFoundError:  # another store swept it just now
            return 0
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its process is alive
            folder = lock.with_suffix("")
            files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
            shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)
            return len(files)

    def staging_files(self) -> list[Path]:
        """Every staged file of every process (in-flight uploads, or leftovers of dead ones)."""
        return sorted(p for p in self.staging_root.rglob("*.part") if p.is_file())

    def close(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
        self._lock_path.unlink(missing_ok=True)
        self._lock_file.close()

    def staging_file(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self._staging, suffix=".part")
        os.close(fd)
        return Path(name)

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key[2:4] / key

    def put_file(self, staged: Path) -> tuple[str, int]:
        """Move a fully written staged file into place (durably); returns (key, size)."""
        with staged.open("rb") as f:
            os.fsync(f.fileno())
        key = sha256_file(staged)
        size = staged.stat().st_size
        self.adopt(staged, key)
        return key, size

    def adopt(self, staged: Path, key: str) -> None:
        """Rename a staged file whose bytes are already fsynced into place under ``key`` (its sha256, or
        a random name that no other blob has), and fsync its folder: durable when this returns."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)  # atomic: readers see the whole blob or none
        _fsync_dir(dest.parent)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        staged = self.staging_file()
        staged.write_bytes(data)
        return self.put_file(staged)

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def count(self) -> int:
        """Number of stored blobs (not counting staging files)."""
        return sum(1 for p in self.root.glob("??/??/*") if p.is_file())
