import hashlib
import os
from pathlib import Path

import pytest

from facefl.fileio import atomic_write, atomic_write_bytes, sha256_file


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # several chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1 << 20) == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it
    assert [p.name for p in path.parent.iterdir()] == ["x.bin"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, b"old")

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
