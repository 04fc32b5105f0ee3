"""Generic verification evaluation: a held-out pair set, embedded once, scored with facefl.metrics.

A `VerificationSet` comes from an LFW-layout directory (``pairs.txt``: its test folds, 6-10 by default)
or from any image folder (genuine pairs within each identity, as many impostor pairs across identities,
ten folds by identity). Images are decoded once, at the size the model needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facefl.data import DataError, ImageFolder, Preprocessing, load_image
from facefl.data.protocol import DevicePlan
from facefl.device_metrics import personalized_report
from facefl.embedders import Embedder
from facefl.metrics import cosine_scores, verification_report

DEFAULT_TEST_FOLDS = range(6, 11)
MAX_GENUINE_PER_IDENTITY = 10
NUM_FOLDS = 10


@dataclass
class VerificationSet:
    name: str
    images: np.ndarray  # (M, S, S, 3) uint8, each distinct image once
    index: np.ndarray  # (P, 2) int64: the two images of each pair
    is_same: np.ndarray  # (P,) bool
    folds: np.ndarray  # (P,) int64

    def __len__(self) -> int:
        return len(self.is_same)

    @classmethod
    def from_dir(
        cls, root: str | Path, image_size: int, test_folds: Iterable[int] = DEFAULT_TEST_FOLDS, seed: int = 0
    ) -> VerificationSet:
        """LFW test folds when ``root/pairs.txt`` exists, else pairs built from the image folder."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"evaluation set directory not found: {root}")
        if (root / "pairs.txt").is_file():
            return cls.from_lfw(root, image_size, test_folds)
        return cls.from_folder(root, image_size, seed=seed)

    @classmethod
    def from_lfw(
        cls, root: Path, image_size: int, test_folds: Iterable[int] = DEFAULT_TEST_FOLDS
    ) -> VerificationSet:
        from facefl.data.lfw import LfwProtocol, pair_arrays, pair_folds

        protocol = LfwProtocol.from_root(root, test_folds=test_folds)
        pairs = protocol.test_pairs
        paths, index, is_same = pair_arrays(pairs)
        return cls(
            f"{root.name} folds {sorted(protocol.test_folds)}",
            _load(paths, image_size),
            index,
            is_same,
            pair_folds(pairs),
        )

    @classmethod
    def from_folder(cls, root: Path, image_size: int, seed: int = 0) -> VerificationSet:
        folder = ImageFolder(root)
        rng = np.random.default_rng(seed)
        labels = np.array([label for _, label in folder.samples], dtype=np.int64)
        by_identity = [np.flatnonzero(labels == k) for k in range(len(folder.identities))]
        identity_fold = rng.permutation(len(folder.identities)) % NUM_FOLDS + 1
        genuine: list[tuple[int, int, int]] = []
        for k, members in enumerate(by_identity):
            candidates = [(int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1 :]]
            rng.shuffle(candidates)
            genuine += [(a, b, int(identity_fold[k])) for a, b in candidates[:MAX_GENUINE_PER_IDENTITY]]
        if not genuine or len(by_identity) < 2:
            raise DataError(f"{root}: need at least two identities and one identity with two images")
        impostor: list[tuple[int, int, int]] = []
        while len(impostor) < len(genuine):
            a, b = rng.integers(0, len(labels), size=2)
            if labels[a] != labels[b]:
                impostor.append((int(a), int(b), int(identity_fold[labels[a]])))
        rows = np.array(genuine + impostor, dtype=np.int64)
        is_same = np.array([True] * len(genuine) + [False] * len(impostor))
        used = np.unique(rows[:, :2])
        remap = np.full(len(labels), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        paths = [folder.samples[i][0] for i in used]
        return cls(root.name, _load(paths, image_size), remap[rows[:, :2]], is_same, rows[:, 2])


def _load(paths: list[Path], image_size: int) -> np.ndarray:
    pre = Preprocessing(image_size)
    return (
        np.stack([pre.to_uint8(load_image(p)) for p in paths])
        if paths
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )


def evaluate_verification(embedder: Embedder, vset: VerificationSet) -> dict[str, float]:
    """accuracy (threshold from the other folds), accuracy_std, auc, tar@far=1e-2, tar@far=1e-3, pairs."""
    emb = embedder.embed(vset.images)
    scores = cosine_scores(emb[vset.index[:, 0]], emb[vset.index[:, 1]])
    return verification_report(scores, vset.is_same, vset.folds)


# ------------------------------------------------------------------------------------- personalized


@dataclass
class DeviceData:
    """One device's images under the device protocol (labels are global identity numbers)."""

    device: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _plan(
    root: str | Path,
    num_devices: int,
    ids_per_device: int,
    heldout_ids: int,
    seed: int,
    max_images_per_identity: int | None,
    exclude: Iterable[str],
) -> DevicePlan:
    from facefl.data.protocol import plan_devices

    return plan_devices(
        ImageFolder(root),
        num_devices,
        ids_per_device,
        heldout_ids,
        seed,
        max_images_per_identity,
        exclude=frozenset(exclude),
    )


def _devices_of(
    root: str | Path,
    plan: DevicePlan,
    test_fraction: float,
    seed: int,
    image_size: int,
    max_images_per_identity: int | None,
) -> list[DeviceData]:
    from facefl.data.protocol import device_split, load_identities

    out: list[DeviceData] = []
    offset = 0
    for d, names in enumerate(plan.devices):
        images, labels = load_identities(root, names, image_size, max_images_per_identity)
        train, test = device_split(labels, test_fraction, seed, names)
        labels = labels + offset  # global identity numbers: devices hold disjoint identities
        out.append(DeviceData(d, images[train], labels[train], images[test], labels[test]))
        offset += len(names)
    return out


def _strangers_of(
    root: str | Path, plan: DevicePlan, image_size: int, max_images_per_identity: int | None
) -> np.ndarray:
    from facefl.data.protocol import load_identities

    images, _ = load_identities(root, plan.heldout, image_size, max_images_per_identity)
    return images


def load_devices(
    root: str | Path,
    *,
    num_devices: int,
    ids_per_device: int,
    heldout_ids: int,
    test_fraction: float,
    seed: int,
    image_size: int,
    max_images_per_identity: int | None = None,
    exclude: Iterable[str] = (),
) -> list[DeviceData]:
    """Devices exactly as `facefl simulate --data ROOT` builds them (same plan and train/test split;
    ``exclude`` as its ``--exclude-identities``)."""
    plan = _plan(root, num_devices, ids_per_device, heldout_ids, seed, max_images_per_identity, exclude)
    return _devices_of(root, plan, test_fraction, seed, image_size, max_images_per_identity)


def load_strangers(
    root: str | Path,
    *,
    num_devices: int,
    ids_per_device: int,
    heldout_ids: int,
    seed: int,
    image_size: int,
    max_images_per_identity: int | None = None,
    exclude: Iterable[str] = (),
) -> np.ndarray:
    """uint8 images of the held-out identities of the plan of :func:`load_devices` (the same arguments
    give the same plan): people on no device, the impostors every device meets besides the other
    devices' test images."""
    plan = _plan(root, num_devices, ids_per_device, heldout_ids, seed, max_images_per_identity, exclude)
    return _strangers_of(root, plan, image_size, max_images_per_identity)


def load_device_protocol(
    root: str | Path,
    *,
    num_devices: int,
    ids_per_device: int,
    heldout_ids: int,
    test_fraction: float,
    seed: int,
    image_size: int,
    max_images_per_identity: int | None = None,
    exclude: Iterable[str] = (),
) -> tuple[list[DeviceData], np.ndarray]:
    """:func:`load_devices` and :func:`load_strangers` of the same arguments, from one plan."""
    plan = _plan(root, num_devices, ids_per_device, heldout_ids, seed, max_images_per_identity, exclude)
    devices = _devices_of(root, plan, test_fraction, seed, image_size, max_images_per_identity)
    return devices, _strangers_of(root, plan, image_size, max_images_per_identity)


def evaluate_personalized(
    embedders: Embedder | Sequence[Embedder],
    devices: Sequence[DeviceData],
    fars: Sequence[float] = (1e-2, 1e-3),
    strangers: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean over devices of 1:1 TAR@FAR and 1:N DIR@FAR (facefl.device_metrics.personalized_report).

    One embedder: the same model on every device (a generic model). One per device: device d's own
    model embeds everything device d sees (its gallery, its probes and every impostor), as on a phone.
    ``strangers`` (images of people on no device, :func:`load_strangers`) are impostors for every
    device; the report then also holds each metric without them, as ``others_only/<metric>`` (the other
    devices' test images as the only impostors), from the same embeddings (personalized_report).
    """
    train_labels = np.concatenate([d.train_labels for d in devices])
    train_devices = np.concatenate([np.full(len(d.train_labels), d.device) for d in devices])
    test_labels = np.concatenate([d.test_labels for d in devices])
    test_devices = np.concatenate([np.full(len(d.test_labels), d.device) for d in devices])

    def per_device(embedder: Embedder) -> list[dict[str, float]]:
        train = embedder.embed(np.concatenate([d.train_images for d in devices]))
        test = embedder.embed(np.concatenate([d.test_images for d in devices]))
        stranger_emb = None if strangers is None else embedder.embed(strangers)
        report = personalized_report(
            train,
            train_labels,
            train_devices,
            test,
            test_labels,
            test_devices,
            fars,
            stranger_emb=stranger_emb,
        )
        rows: list[dict[str, float]] = report["per_device"]
        return rows

    if not isinstance(embedders, Sequence):
        rows = per_device(embedders)
    elif len(embedders) != len(devices):
        raise ValueError(f"{len(embedders)} embedders for {len(devices)} devices")
    else:
        rows = [
            next(e for e in per_device(emb) if e["device"] == d.device)
            for emb, d in zip(embedders, devices, strict=True)
        ]
    keys = [k for k in rows[0] if k not in _COUNTS]
    result: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    result.update(devices=float(len(rows)), strangers=float(0 if strangers is None else len(strangers)))
    result["per_device"] = rows
    return result


_COUNTS = ("device", "identities", "test_images")  # per-device entries that are not metrics


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: Any) -> None:
    p.add_argument("model", help="a facefl checkpoint (.safetensors) or any ONNX face-embedding model (NCHW)")
    p.add_argument(
        "--lfw", help="generic set: an LFW-layout directory (pairs.txt; folds 6-10) or image folder"
    )
    p.add_argument("--devices-data", help="personalized: an image folder split into devices (e.g. CelebA)")
    p.add_argument("--devices", type=int, default=30, help="devices in the personalized protocol (30)")
    p.add_argument("--ids-per-device", type=int, default=8, help="identities per device (8)")
    p.add_argument("--heldout-ids", type=int, default=50, help="identities held out of the devices (50)")
    p.add_argument("--test-fraction", type=float, default=0.3, help="test share of each identity (0.3)")
    p.add_argument("--images-per-id", type=int, default=None, help="cap of images per identity")
    p.add_argument("--seed", type=int, default=0, help="seed of the device plan and splits (0)")
    p.add_argument(
        "--no-strangers",
        action="store_true",
        help="impostors are only the other devices' test images (by default the held-out people too)",
    )
    p.add_argument(
        "--exclude-identities",
        default="",
        help="comma-separated identity folders left out of the plan (facefl audit-data finds candidates)",
    )
    p.add_argument("--flip", action="store_true", help="average each embedding with its mirror image's")
    p.add_argument("--json", dest="json_path", help="write the report as JSON here")
    p.add_argument("--roc", help="draw the generic ROC curve to this PNG")


def run(args: Any) -> int:
    import json
    import sys

    from facefl.embedders import load_embedder

    if not args.lfw and not args.devices_data:
        print("facefl eval: error: give --lfw DIR and/or --devices-data DIR", file=sys.stderr)
        return 2
    if not 0.0 < args.test_fraction < 1.0:
        print("facefl eval: error: --test-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    try:
        embedder = load_embedder(args.model, flip=args.flip)
        report: dict[str, Any] = {"model": str(args.model), "flip": bool(args.flip)}
        if args.lfw:
            vset = VerificationSet.from_dir(args.lfw, embedder.image_size)
            emb = embedder.embed(vset.images)
            scores = cosine_scores(emb[vset.index[:, 0]], emb[vset.index[:, 1]])
            report["generic"] = {"set": vset.name, **verification_report(scores, vset.is_same, vset.folds)}
            if args.roc:
                _plot_roc(scores, vset.is_same, Path(args.roc), f"{Path(args.model).name} on {vset.name}")
        if args.devices_data:
            protocol: dict[str, Any] = {
                "num_devices": args.devices,
                "ids_per_device": args.ids_per_device,
                "heldout_ids": args.heldout_ids,
                "test_fraction": args.test_fraction,
                "seed": args.seed,
                "image_size": embedder.image_size,
                "max_images_per_identity": args.images_per_id,
                "exclude": [n.strip() for n in args.exclude_identities.split(",") if n.strip()],
            }
            strangers: np.ndarray | None = None
            if args.no_strangers:
                devices = load_devices(args.devices_data, **protocol)
            else:
                devices, strangers = load_device_protocol(args.devices_data, **protocol)
            personal = evaluate_personalized(embedder, devices, strangers=strangers)
            report["personalized"] = {k: v for k, v in personal.items() if k != "per_device"}
    except (DataError, ValueError, OSError) as exc:
        print(f"facefl eval: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for section in ("generic", "personalized"):
        if section in report:
            values = report[section]
            cells = [f"{k}={_fmt(v)}" for k, v in values.items()]
            lines.append(f"{section:>12}: " + "  ".join(cells))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def _plot_roc(scores: np.ndarray, is_same: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facefl.metrics import roc_curve

    far, tar, _ = roc_curve(scores, is_same)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(np.maximum(far, 1e-4), tar)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
