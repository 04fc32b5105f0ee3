"""Pretraining's data: the LFW public split decoded once into memory, and the held-out pairs.

All training images are decoded once, at the model's input size, into one uint8 array; the evaluation
pairs (test folds, or ``--val-folds``) likewise. The data fingerprint (paths and labels) is part of what
a resumed run must share with the state it resumes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facefl.pretrain.config import PretrainConfig

if TYPE_CHECKING:
    from facefl.evaluation import VerificationSet

__all__ = ["PretrainData", "load_data"]


@dataclass(frozen=True)
class PretrainData:
    """The decoded public split (training) and the held-out pairs (evaluation)."""

    images: np.ndarray  # (N, S, S, 3) uint8 at the model's input size
    labels: np.ndarray  # (N,) public identity index
    num_identities: int
    eval_set: VerificationSet
    eval_name: str  # e.g. "test folds [6, 7, 8, 9, 10]"
    fingerprint: str  # of the training paths and labels


def load_data(
    config: PretrainConfig, image_size: int, say: Callable[[str], None], headline: str
) -> PretrainData:
    """The public split of ``config.data`` and its held-out pairs, decoded at ``image_size``. ``say``
    gets ``headline`` with what will be trained and evaluated on, then the decoding time."""
    from facefl.data import DataError
    from facefl.data.lfw import LfwProtocol, pair_arrays, pair_folds
    from facefl.evaluation import VerificationSet

    protocol = LfwProtocol.from_root(
        config.data, test_folds=config.test_folds, validation_folds=config.val_folds
    )
    train_list = protocol.public_images(config.min_images)
    if len(train_list.identities) < 2:
        raise DataError(f"{config.data}: the public split has fewer than two identities to train on")
    eval_pairs = protocol.validation_pairs if config.val_folds else protocol.test_pairs
    eval_name = f"{'validation' if config.val_folds else 'test'} folds {sorted({p.fold for p in eval_pairs})}"
    say(
        f"{headline} on {len(train_list)} images of {len(train_list.identities)} public identities; "
        f"evaluating on {len(eval_pairs)} pairs, {eval_name}"
    )
    t0 = time.perf_counter()
    images = _decode_all(train_list.paths, image_size, config.workers, "decode public")
    eval_paths, eval_index, eval_same = pair_arrays(eval_pairs)
    vset = VerificationSet(
        eval_name,
        _decode_all(eval_paths, image_size, config.workers, "decode eval"),
        eval_index,
        eval_same,
        pair_folds(eval_pairs),
    )
    say(f"decoded {len(images) + len(vset.images)} images in {time.perf_counter() - t0:.1f}s")
    return PretrainData(
        images=images,
        labels=train_list.labels,
        num_identities=len(train_list.identities),
        eval_set=vset,
        eval_name=eval_name,
        fingerprint=_fingerprint(protocol.root, train_list.paths, train_list.labels),
    )


def _decode_all(paths: Sequence[Path], image_size: int, workers: int, desc: str) -> np.ndarray:
    from tqdm import tqdm

    from facefl.data import Preprocessing, load_image

    pre = Preprocessing(image_size=image_size)
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = pre.to_uint8(load_image(paths[i]))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in tqdm(
            pool.map(one, range(len(paths))), total=len(paths), desc=desc, leave=False, disable=None
        ):
            pass
    return out


def _fingerprint(root: Path, paths: Sequence[Path], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for p, label in zip(paths, labels.tolist(), strict=True):
        h.update(f"{p.relative_to(root)}\t{label}\n".encode())
    return h.hexdigest()[:16]
