"""Content-addressed blob store on the filesystem (keys = sha256 hex). S3 could implement the same API."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

from facefl.fileio import sha256_file


class BlobStore(Protocol):
    def staging_file(self) -> Path: ...
    def put_file(self, staged: Path) -> tuple[str, int]: ...
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
    """root/ab/cd/<sha256>; writes go to root/staging and are renamed into place after fsync."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._staging = self.root / "staging"
        self._staging.mkdir(parents=True, exist_ok=True)

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
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)  # atomic: readers see the whole blob or none
        _fsync_dir(dest.parent)
        return key, size

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
