"""LFW View 2 pairs reader and the public / test protocol split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facefl.data import DataError, LfwProtocol, Pair, pair_arrays, pair_folds, read_pairs, write_synthetic_lfw
from facefl.data.lfw import lfw_image_path

REAL_LFW = Path(__file__).resolve().parents[4] / "shared" / "data" / "lfw"

VALID = "2\t2\nAlice\t1\t2\nBob\t1\t3\nAlice\t1\tCarol\t1\nBob\t2\tDan\t1\n" + (
    "Eve\t1\t2\nEve\t2\t3\nEve\t1\tFrank\t2\nGina\t1\tHal\t1\n"
)


def test_read_valid_pairs(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(VALID)
    pairs = read_pairs(path)
    assert len(pairs) == 8
    assert [p.fold for p in pairs] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [p.same for p in pairs] == [True, True, False, False] * 2
    assert pairs[0] == Pair(1, tmp_path / "Alice/Alice_0001.jpg", tmp_path / "Alice/Alice_0002.jpg", True)
    assert pairs[2].left_identity == "Alice" and pairs[2].right_identity == "Carol"
    assert pairs[3].identities == frozenset({"Bob", "Dan"})
    # another image root; spaces as separators and trailing blank lines are fine
    path.write_text(VALID.replace("\t", " ") + "\n\n")
    other = read_pairs(path, root=tmp_path / "img")
    assert other[1].right == tmp_path / "img" / "Bob" / "Bob_0003.jpg"


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("", 1, "empty pairs file"),
        ("10\nA\t1\t2\n", 1, "bad header"),
        ("x 2\n", 1, "bad header"),
        ("0 2\n", 1, "bad header"),
        ("2\t2\t1\n", 1, "bad header"),
        (VALID.replace("Bob\t1\t3", "Bob\t1\t3\t4"), 3, "expected 3 fields"),
        (VALID.replace("Bob\t2\tDan\t1", "Bob\t2\tDan"), 5, "expected 4 fields"),
        (VALID.replace("Eve\t2\t3", "Eve\ttwo\t3"), 7, "is not an integer"),
        (VALID.replace("Gina\t1\tHal\t1", "Gina\t1\tHal\t0"), 9, "must be >= 1"),
        (VALID.rsplit("\n", 2)[0] + "\n", 9, "file ends after 7 pair lines"),
        (VALID + "Ian\t1\t2\n", 10, "unexpected extra line"),
        (VALID.replace("Bob\t1\t3\n", "\nBob\t1\t3\n", 1), 3, "expected 3 fields"),
    ],
)
def test_malformed_pairs_name_file_and_line(tmp_path: Path, text: str, line: int, needle: str) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_pairs(path)
    assert str(path) in str(err.value)
    assert f"line {line}:" in str(err.value)
    assert needle in str(err.value)


def test_missing_pairs_file_and_missing_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_pairs(tmp_path / "nope.txt")
    root = write_synthetic_lfw(tmp_path / "lfw", num_folds=2, image_size=16)
    assert len(read_pairs(root / "pairs.txt", check_exists=True)) == 8
    victim = read_pairs(root / "pairs.txt")[5].right
    victim.unlink()
    with pytest.raises(DataError) as err:
        read_pairs(root / "pairs.txt", check_exists=True)
    assert str(victim) in str(err.value) and "line 7" in str(err.value)
    assert len(read_pairs(root / "pairs.txt")) == 8  # existence is only checked on request


def test_protocol_split_is_identity_disjoint(tmp_path: Path) -> None:
    root = write_synthetic_lfw(
        tmp_path, num_folds=10, identities_per_fold=3, extra_identities=4, image_size=16
    )
    protocol = LfwProtocol.from_root(root)
    assert protocol.num_folds == 10 and protocol.test_folds == frozenset(range(6, 11))
    assert len(protocol.test_pairs) == 5 * 4 and {p.fold for p in protocol.test_pairs} == set(range(6, 11))
    test_ids = {name for p in protocol.test_pairs for name in p.identities}
    public = set(protocol.public_identities)
    assert not public & test_ids
    # public = identities of folds 1-5 (3 each) + the 4 identities in no fold
    fold_1_5 = protocol.fold_identities(range(1, 6))
    no_fold = set(protocol.all_identities) - protocol.fold_identities(range(1, 11))
    assert len(no_fold) == 4 and public == fold_1_5 | no_fold and len(public) == 19
    assert {p.fold for p in protocol.public_pairs} == set(range(1, 6))

    images = protocol.public_images()
    assert len(images) == 19 * 3 and images.identities == sorted(public)
    np.testing.assert_array_equal(np.bincount(images.labels), [3] * 19)
    assert all(
        path.parent.name == images.identities[label]
        for path, label in zip(images.paths, images.labels, strict=True)
    )
    assert len(protocol.public_images(min_images=4)) == 0


def test_validation_folds_are_held_out_of_the_public_set(tmp_path: Path) -> None:
    root = write_synthetic_lfw(tmp_path, num_folds=10, extra_identities=2, image_size=16)
    protocol = LfwProtocol.from_root(root, validation_folds=[4, 5])
    assert {p.fold for p in protocol.validation_pairs} == {4, 5}
    assert {p.fold for p in protocol.public_pairs} == {1, 2, 3}
    assert not set(protocol.public_identities) & protocol.fold_identities([4, 5, 6, 7, 8, 9, 10])
    assert len(protocol.public_identities) == 3 * 3 + 2
    with pytest.raises(ValueError, match="both test and validation"):
        LfwProtocol.from_root(root, validation_folds=[5, 6])
    with pytest.raises(ValueError, match="out of range"):
        LfwProtocol.from_root(root, test_folds=[11])


def test_overlapping_folds_are_refused(tmp_path: Path) -> None:
    root = write_synthetic_lfw(tmp_path, num_folds=10, image_size=16)
    lines = (root / "pairs.txt").read_text().splitlines()
    # a fold-7 same pair that reuses an identity of fold 2
    fold2_name = lines[1 + 1 * 4].split()[0]
    lines[1 + 6 * 4] = f"{fold2_name}\t1\t2"
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="identity-disjoint"):
        LfwProtocol.from_root(root)


def test_missing_root_and_pair_arrays(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        LfwProtocol.from_root(tmp_path / "absent")
    pairs = [
        Pair(1, Path("a/1"), Path("b/1"), False),
        Pair(1, Path("a/1"), Path("a/2"), True),
        Pair(2, Path("b/1"), Path("a/2"), False),
    ]
    paths, index, same = pair_arrays(pairs)
    assert paths == [Path("a/1"), Path("b/1"), Path("a/2")]
    np.testing.assert_array_equal(index, [[0, 1], [0, 2], [1, 2]])
    np.testing.assert_array_equal(same, [False, True, False])
    np.testing.assert_array_equal(pair_folds(pairs), [1, 1, 2])
    assert lfw_image_path("r", "X_Y", 7) == Path("r/X_Y/X_Y_0007.jpg")


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_LFW / "pairs.txt").is_file(), reason="real LFW data not present")
def test_real_lfw_pairs() -> None:
    pairs = read_pairs(REAL_LFW / "pairs.txt", check_exists=True)
    assert len(pairs) == 6000
    assert sorted({p.fold for p in pairs}) == list(range(1, 11))
    for fold in range(1, 11):
        in_fold = [p for p in pairs if p.fold == fold]
        assert sum(p.same for p in in_fold) == 300 and len(in_fold) == 600
    ids = [{name for p in pairs if p.fold == f for name in p.identities} for f in range(1, 11)]
    for a in range(10):
        for b in range(a + 1, 10):
            assert not ids[a] & ids[b], f"folds {a + 1} and {b + 1} share identities"
    protocol = LfwProtocol.from_root(REAL_LFW)
    assert len(protocol.test_pairs) == 3000
    assert not set(protocol.public_identities) & protocol.fold_identities(range(6, 11))
    assert len(protocol.all_identities) == 5749
