"""LFW View 2 verification pairs and the public / test split of the mini-FedFR protocol.

``pairs.txt`` (the standard View 2 list) starts with a header ``"<folds> <pairs per fold>"`` (``10 300``),
then for each fold ``n`` *same* lines ``name i j`` followed by ``n`` *different* lines
``name1 i name2 j`` (fields separated by tabs or spaces). Image ``i`` of ``name`` is
``<root>/<name>/<name>_<iiii>.jpg`` (1-based, four digits).

The benchmark protocol (docs/architecture.md, "Evaluation protocol"): the server's public set -- and
centralized pretraining -- uses the identities of pair folds 1-5 plus the identities that appear in no
fold; folds 6-10 are the generic test set. LFW's folds are identity-disjoint, so no test identity is
ever trained on; :meth:`LfwProtocol.from_root` checks that instead of assuming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facefl.data.folder import DataError

PAIRS_FILE = "pairs.txt"
DEFAULT_TEST_FOLDS: tuple[int, ...] = (6, 7, 8, 9, 10)


def lfw_image_path(root: str | Path, name: str, index: int) -> Path:
    """``<root>/<name>/<name>_<index:04d>.jpg``: image ``index`` (1-based) of identity ``name``."""
    return Path(root) / name / f"{name}_{index:04d}.jpg"


@dataclass(frozen=True)
class Pair:
    """One verification pair: fold number (1-based), the two image paths, and whether same person."""

    fold: int
    left: Path
    right: Path
    same: bool

    @property
    def left_identity(self) -> str:
        return self.left.parent.name

    @property
    def right_identity(self) -> str:
        return self.right.parent.name

    @property
    def identities(self) -> frozenset[str]:
        return frozenset((self.left_identity, self.right_identity))


def _parse_index(text: str, path: Path, line_no: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{path}, line {line_no}: image index {text!r} is not an integer") from None
    if value < 1:
        raise DataError(f"{path}, line {line_no}: image index {value} must be >= 1")
    return value


def read_pairs(path: str | Path, root: str | Path | None = None, check_exists: bool = False) -> list[Pair]:
    """Parse a View 2 ``pairs.txt``. Image paths are under ``root`` (default: the file's directory).

    Strict: a bad header, a line with the wrong number of fields for its block, a non-integer or
    non-positive index, or too few / too many lines is a :class:`DataError` naming the file and line.
    With ``check_exists`` every referenced image must exist (DataError naming the first missing file).
    """
    path = Path(path)
    image_root = path.parent if root is None else Path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"pairs file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read pairs file {path}: {exc}") from exc
    lines = text.splitlines()
    # trailing blank lines are tolerated; blank lines elsewhere are not (they shift the blocks)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}, line 1: empty pairs file (expected a header like '10 300')")
    header = lines[0].split()
    if len(header) != 2 or not all(h.isdigit() for h in header) or min(int(h) for h in header) < 1:
        raise DataError(
            f"{path}, line 1: bad header {lines[0]!r} (expected '<folds> <pairs per fold>', e.g. '10 300')"
        )
    num_folds, per_fold = int(header[0]), int(header[1])
    expected_lines = 1 + num_folds * 2 * per_fold
    pairs: list[Pair] = []
    for k in range(1, expected_lines):
        line_no = k + 1
        if k >= len(lines):
            raise DataError(
                f"{path}, line {line_no}: file ends after {len(lines) - 1} pair lines; the header announces "
                f"{num_folds} folds x {2 * per_fold} pairs = {expected_lines - 1}"
            )
        fields = lines[k].split()
        fold = (k - 1) // (2 * per_fold) + 1
        same = (k - 1) % (2 * per_fold) < per_fold
        if same:
            if len(fields) != 3:
                raise DataError(
                    f"{path}, line {line_no}: expected 3 fields 'name i j' (a same-person pair of fold "
                    f"{fold}), got {len(fields)}: {lines[k]!r}"
                )
            name, i, j = fields
            left = lfw_image_path(image_root, name, _parse_index(i, path, line_no))
            right = lfw_image_path(image_root, name, _parse_index(j, path, line_no))
        else:
            if len(fields) != 4:
                raise DataError(
                    f"{path}, line {line_no}: expected 4 fields 'name1 i name2 j' (a different-person pair "
                    f"of fold {fold}), got {len(fields)}: {lines[k]!r}"
                )
            name1, i, name2, j = fields
            left = lfw_image_path(image_root, name1, _parse_index(i, path, line_no))
            right = lfw_image_path(image_root, name2, _parse_index(j, path, line_no))
        if check_exists:
            for image in (left, right):
                if not image.is_file():
                    raise DataError(f"{path}, line {line_no}: image {image} does not exist")
        pairs.append(Pair(fold=fold, left=left, right=right, same=same))
    if len(lines) > expected_lines:
        raise DataError(
            f"{path}, line {expected_lines + 1}: unexpected extra line; the header announces "
            f"{num_folds} folds x {2 * per_fold} pairs = {expected_lines - 1} pair lines"
        )
    return pairs


@dataclass(frozen=True)
class ImageList:
    """Image paths with integer labels (indices into ``identities``), e.g. a pretraining set."""

    paths: list[Path]
    labels: np.ndarray  # (N,) int64
    identities: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _list_identity_images(root: Path, name: str) -> list[Path]:
    folder = root / name
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".jpg")


def _parse_folds(folds: Iterable[int], num_folds: int, what: str) -> frozenset[int]:
    out = frozenset(int(f) for f in folds)
    bad = sorted(f for f in out if not 1 <= f <= num_folds)
    if bad:
        raise ValueError(f"{what} {bad} out of range: the pairs file has folds 1..{num_folds}")
    return out


@dataclass(frozen=True)
class LfwProtocol:
    """The public / validation / test split of an LFW-layout root with a View 2 ``pairs.txt``.

    - ``test_pairs``: pairs of ``test_folds`` (default 6-10), never trained on.
    - ``validation_pairs``: pairs of ``validation_folds`` (default none), for choosing hyper-parameters
      without looking at the test folds; their identities are also excluded from the public set.
    - ``public_identities``: every identity directory under ``root`` that appears in no test or
      validation pair, i.e. the identities of the remaining folds plus those in no fold at all.
    """

    root: Path
    pairs: list[Pair]
    num_folds: int
    test_folds: frozenset[int]
    validation_folds: frozenset[int]
    public_identities: list[str]
    all_identities: list[str] = field(repr=False)

    @classmethod
    def from_root(
        cls,
        root: str | Path,
        test_folds: Iterable[int] = DEFAULT_TEST_FOLDS,
        validation_folds: Iterable[int] = (),
        pairs_file: str | Path = PAIRS_FILE,
        check_images: bool = True,
    ) -> LfwProtocol:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"LFW directory {root} does not exist or is not a directory")
        pairs_path = Path(pairs_file) if Path(pairs_file).is_absolute() else root / pairs_file
        pairs = read_pairs(pairs_path, root=root, check_exists=check_images)
        num_folds = max(p.fold for p in pairs)
        test = _parse_folds(test_folds, num_folds, "test folds")
        val = _parse_folds(validation_folds, num_folds, "validation folds")
        if not test and not val:
            raise ValueError("at least one test or validation fold is needed")
        if test & val:
            raise ValueError(f"folds {sorted(test & val)} are both test and validation folds")
        identities = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        held_out = {name for p in pairs if p.fold in test | val for name in p.identities}
        public = [name for name in identities if name not in held_out]
        protocol = cls(
            root=root,
            pairs=pairs,
            num_folds=num_folds,
            test_folds=test,
            validation_folds=val,
            public_identities=public,
            all_identities=identities,
        )
        protocol.check_disjoint()
        return protocol

    def fold_identities(self, folds: Iterable[int]) -> set[str]:
        wanted = set(folds)
        return {name for p in self.pairs if p.fold in wanted for name in p.identities}

    def check_disjoint(self) -> None:
        """DataError unless the public, validation and test identities are pairwise disjoint.

        The public set excludes held-out identities by construction; what can actually fail is a pairs
        file whose folds share identities (then a public fold's pair would show a test identity).
        """
        public_folds = set(range(1, self.num_folds + 1)) - self.test_folds - self.validation_folds
        groups = {
            "public": self.fold_identities(public_folds) | set(self.public_identities),
            "validation": self.fold_identities(self.validation_folds),
            "test": self.fold_identities(self.test_folds),
        }
        names = list(groups)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                shared = groups[names[a]] & groups[names[b]]
                if shared:
                    raise DataError(
                        f"{self.root / PAIRS_FILE}: {len(shared)} identities appear in both the "
                        f"{names[a]} and the {names[b]} folds (e.g. {sorted(shared)[:3]}); "
                        "the protocol needs identity-disjoint folds"
                    )

    @property
    def test_pairs(self) -> list[Pair]:
        return [p for p in self.pairs if p.fold in self.test_folds]

    @property
    def validation_pairs(self) -> list[Pair]:
        return [p for p in self.pairs if p.fold in self.validation_folds]

    @property
    def public_pairs(self) -> list[Pair]:
        """Pairs of the folds that are neither test nor validation (their identities are public)."""
        return [p for p in self.pairs if p.fold not in self.test_folds | self.validation_folds]

    def public_images(self, min_images: int = 1) -> ImageList:
        """Every image of the public identities having at least ``min_images`` images (for pretraining).

        Labels index the returned ``identities`` (sorted names); identities below the threshold are
        dropped entirely, so labels stay contiguous.
        """
        if min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {min_images}")
        paths: list[Path] = []
        labels: list[int] = []
        kept: list[str] = []
        for name in self.public_identities:
            files = _list_identity_images(self.root, name)
            if len(files) < min_images:
                continue
            paths.extend(files)
            labels.extend([len(kept)] * len(files))
            kept.append(name)
        return ImageList(paths=paths, labels=np.asarray(labels, dtype=np.int64), identities=kept)


def pair_arrays(pairs: Sequence[Pair]) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The distinct image paths of ``pairs`` and, per pair, the indices of its two images in that list.

    Returns ``(paths, index (P, 2) int64, is_same (P,) bool)``: embed ``paths`` once, then score
    ``emb[index[:, 0]]`` against ``emb[index[:, 1]]`` (:func:`pair_folds` gives each pair's fold).
    """
    position: dict[Path, int] = {}
    index = np.zeros((len(pairs), 2), dtype=np.int64)
    for k, p in enumerate(pairs):
        for side, image in enumerate((p.left, p.right)):
            index[k, side] = position.setdefault(image, len(position))
    return list(position), index, np.array([p.same for p in pairs], dtype=bool)


def pair_folds(pairs: Sequence[Pair]) -> np.ndarray:
    """(P,) int64 fold number of each pair."""
    return np.array([p.fold for p in pairs], dtype=np.int64)


def write_synthetic_lfw(
    root: str | Path,
    num_folds: int = 10,
    pairs_per_fold: int = 2,
    identities_per_fold: int = 3,
    images_per_identity: int = 3,
    extra_identities: int = 5,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a small LFW-layout dataset of generated faces (:mod:`facefl.data.synthetic`) with a View 2
    style ``pairs.txt`` whose folds are identity-disjoint; returns ``root``.

    Fold ``f`` uses its own ``identities_per_fold`` identities (same pairs within one of them, different
    pairs between two of them); ``extra_identities`` more identities appear in no fold. Identity folders are
    named ``Synth_<number>``; images are JPEG files ``Synth_<number>_<iiii>.jpg``.
    """
    from PIL import Image

    from facefl.data.synthetic import synthetic_identity_images

    if num_folds < 1 or pairs_per_fold < 1 or identities_per_fold < 2 or images_per_identity < 2:
        raise ValueError(
            "need num_folds, pairs_per_fold >= 1 and identities_per_fold, images_per_identity >= 2"
        )
    root = Path(root)
    total = num_folds * identities_per_fold + extra_identities
    names = [f"Synth_{k:05d}" for k in range(total)]
    for k, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        images = synthetic_identity_images(k, images_per_identity, image_size, seed)
        for i, image in enumerate(images, start=1):
            Image.fromarray(image).save(lfw_image_path(root, name, i), quality=95)
    rng = np.random.default_rng(seed)
    lines = [f"{num_folds}\t{pairs_per_fold}"]
    for fold in range(num_folds):
        members = names[fold * identities_per_fold : (fold + 1) * identities_per_fold]
        for p in range(pairs_per_fold):
            i, j = rng.choice(np.arange(1, images_per_identity + 1), size=2, replace=False)
            lines.append(f"{members[p % len(members)]}\t{i}\t{j}")
        for p in range(pairs_per_fold):
            a, b = p % len(members), (p + 1) % len(members)
            i, j = rng.integers(1, images_per_identity + 1, size=2)
            lines.append(f"{members[a]}\t{i}\t{members[b]}\t{j}")
    (root / PAIRS_FILE).write_text("\n".join(lines) + "\n")
    return root
