"""The <root>/<identity>/<file> reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facefl.data import DataError, ImageFolder, load_image, synthetic_identity_images, write_image_folder


def test_reads_written_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "ds", identities=[3, 1, 2], images_per_identity=2, image_size=32)
    folder = ImageFolder(root)
    assert folder.identities == ["id_000001", "id_000002", "id_000003"]
    assert len(folder) == 6
    assert [label for _, label in folder.samples] == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(folder.labels, [0, 0, 1, 1, 2, 2])
    image, label = folder.load(4)
    assert label == 2 and image.dtype == np.uint8 and image.shape == (32, 32, 3)
    # PNG is lossless: the file holds exactly the generated pixels
    np.testing.assert_array_equal(image, synthetic_identity_images(3, 2, 32)[0])
    np.testing.assert_array_equal(folder.load_image(folder.samples[0][0]), load_image(folder.samples[0][0]))


def test_ignores_non_images_and_hidden_entries_and_accepts_other_formats(tmp_path: Path) -> None:
    (tmp_path / "alice").mkdir()
    (tmp_path / ".cache").mkdir()
    (tmp_path / "notes.txt").write_text("not an identity")
    (tmp_path / "alice" / "readme.txt").write_text("x")
    (tmp_path / "alice" / ".hidden.png").write_bytes(b"junk")
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(gray).save(tmp_path / "alice" / "a.PNG")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "alice" / "b.webp")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "alice" / "c.jpeg")
    folder = ImageFolder(tmp_path)
    assert folder.identities == ["alice"]
    assert [p.name for p, _ in folder.samples] == ["a.PNG", "b.webp", "c.jpeg"]
    rgb = folder.load(0)[0]
    assert rgb.shape == (8, 8, 3)  # grayscale and RGBA files come back as RGB
    np.testing.assert_array_equal(rgb[..., 1], gray)
    assert folder.load(1)[0].shape == (8, 8, 3)


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        ImageFolder(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_root_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file.png"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        ImageFolder(path)


def test_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no identity sub-directories") as info:
        ImageFolder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_identity_without_images(tmp_path: Path) -> None:
    write_image_folder(tmp_path, [0], 1, image_size=16)
    (tmp_path / "empty_person").mkdir()
    (tmp_path / "empty_person" / "list.txt").write_text("")
    with pytest.raises(DataError, match="contains no images") as info:
        ImageFolder(tmp_path)
    assert str(tmp_path / "empty_person") in str(info.value)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bob").mkdir()
    bad = tmp_path / "bob" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    folder = ImageFolder(tmp_path)  # indexing does not decode
    with pytest.raises(DataError, match="cannot read image") as info:
        folder.load(0)
    assert str(bad) in str(info.value)
    truncated = tmp_path / "bob" / "truncated.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match=r"truncated\.png"):
        load_image(truncated)
    with pytest.raises(DataError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
