"""The device protocol on an image folder: which identities each simulated device holds, which are held
out, and how each device's images split into training and test. One definition, used by the simulator
(what devices train on) and by evaluation (what devices are tested on), so the two always agree.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefl.data.folder import DataError, ImageFolder, load_image
from facefl.data.partition import partition_identities, split_train_test
from facefl.data.preprocess import Preprocessing


@dataclass(frozen=True)
class DevicePlan:
    devices: list[list[str]]  # identity names held by each device (disjoint)
    heldout: list[str]  # identities on no device (with at least two images)


def plan_devices(
    folder: ImageFolder,
    num_devices: int,
    ids_per_device: int,
    heldout_ids: int,
    seed: int,
    max_images_per_identity: int | None = None,
    min_device_images: int = 2,
    exclude: Collection[str] = (),
) -> DevicePlan:
    """Held-out identities first (seeded order, >= 2 images each), then devices from the rest.

    ``exclude``: identity folders left out of the plan altogether (a person filed twice, a folder mixing
    people: ``facefl audit-data``); a name that is not a folder of ``folder`` is a DataError.
    """
    unknown = sorted(set(exclude) - set(folder.identities))
    if unknown:
        raise DataError(f"excluded identities not in {folder.root}: {', '.join(unknown[:5])}")
    counts = Counter(label for _, label in folder.samples)
    cap = max_images_per_identity
    usable = {
        name: min(counts[i], cap) if cap else counts[i]
        for i, name in enumerate(folder.identities)
        if name not in exclude
    }
    names = list(usable)  # folder order, less the excluded
    order = [names[int(i)] for i in np.random.default_rng(seed).permutation(len(names))]
    heldout = [name for name in order if usable[name] >= 2][:heldout_ids]
    taken = set(heldout)
    rest = [name for name in order if name not in taken]
    needed = num_devices * ids_per_device
    if len(heldout) < heldout_ids or len(rest) < needed:
        raise DataError(
            f"{folder.root} has {len(usable)} identity folders{' not excluded' if exclude else ''} "
            f"({sum(c >= 2 for c in usable.values())} with "
            f"two or more images); the plan needs {heldout_ids} held-out identities with >= 2 images plus "
            f"{needed} device identities ({num_devices} devices x {ids_per_device})"
        )
    devices = partition_identities(rest, num_devices, ids_per_device, seed)
    for i, part in enumerate(devices):
        if sum(usable[name] for name in part) < min_device_images:
            raise DataError(
                f"device {i} would hold fewer than {min_device_images} images; raise ids_per_device"
            )
    return DevicePlan(devices=devices, heldout=heldout)


def load_identities(
    root: str | Path, identities: Sequence[str], image_size: int, max_images_per_identity: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, S, S, 3) and labels (index into ``identities``), in folder order."""
    folder = ImageFolder(root)
    label_of = {name: i for i, name in enumerate(folder.identities)}
    unknown = [name for name in identities if name not in label_of]
    if unknown:
        raise DataError(f"{root}: no identity folder(s) {unknown[:5]}")
    new_label = {label_of[name]: i for i, name in enumerate(identities)}
    prep = Preprocessing(image_size)
    images: list[np.ndarray] = []
    labels: list[int] = []
    taken: Counter[int] = Counter()
    for path, old in folder.samples:
        if old not in new_label or (
            max_images_per_identity is not None and taken[old] >= max_images_per_identity
        ):
            continue
        taken[old] += 1
        images.append(prep.to_uint8(load_image(path)))
        labels.append(new_label[old])
    array = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return array, np.asarray(labels, np.int64)


def device_split(
    labels: np.ndarray, test_fraction: float, seed: int, identities: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A device's (train, test) indices: each identity keeps at least one training image.

    With the device's ``identities`` (names, indexed by label) each person's split is keyed on its
    name, so it does not depend on the device's other identities (FedFace's one-identity devices and
    FedFR's ten-identity devices then agree on every person's test images).
    """
    keys = [zlib.crc32(name.encode("utf-8")) for name in identities] if identities is not None else None
    return split_train_test(labels, test_fraction, seed, min_train=1, label_keys=keys)
