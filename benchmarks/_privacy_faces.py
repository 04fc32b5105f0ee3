"""The faces of the privacy audit (``benchmarks/privacy_audit.py``): who is a target, a companion, a
secure-aggregation bystander or a gallery distractor, and dlib's ResNet as the judge of a reconstruction."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facefl.data import ImageFolder, load_image, preprocessing_for, synthetic_identity_images
from facefl.embedders import TorchEmbedder

GALLERY_PER_ID = 5


@dataclass(frozen=True)
class Face:
    identity: str
    pixels: np.ndarray  # (S, S, 3) uint8 at the device's input size


@dataclass(frozen=True)
class Faces:
    targets: list[Face]  # device 1's face, one per target person
    companions: list[Face]  # the other person enrolled on each device (its head's second row)
    bystanders: list[list[Face]]  # per target: the faces of secure aggregation's other devices
    gallery: dict[str, list[np.ndarray]]  # enrolled people (targets' other photos + distractors)


def _people(args: argparse.Namespace, need: int, arch: str) -> list[tuple[str, list[np.ndarray]]]:
    """``need`` people (name, up to 1 + GALLERY_PER_ID faces at the device's input size), at least two
    faces each, chosen at random (``--seed``) from the real folder, or synthetic identities 0..need-1."""
    prep = preprocessing_for(arch)
    size = prep.image_size
    if args.synthetic:
        return [
            (f"synthetic-{i}", list(synthetic_identity_images(i, 1 + GALLERY_PER_ID, size)))
            for i in range(need)
        ]
    folder = ImageFolder(Path(args.data) / args.dataset)
    by_label: dict[int, list[Path]] = {}
    for path, label in folder.samples:
        by_label.setdefault(label, []).append(path)
    eligible = sorted(label for label, paths in by_label.items() if len(paths) >= 2)
    if len(eligible) < need:
        raise SystemExit(f"need {need} people with at least 2 images, {folder.root} has {len(eligible)}")
    rng = np.random.default_rng(args.seed)
    chosen = [eligible[i] for i in rng.permutation(len(eligible))[:need]]
    return [
        (
            folder.identities[label],
            [prep.to_uint8(load_image(p)) for p in by_label[label][: 1 + GALLERY_PER_ID]],
        )
        for label in chosen
    ]


def load_faces(args: argparse.Namespace, arch: str) -> Faces:
    """Targets, companions, bystanders and the gallery (every person appears in one role only)."""
    others = max([1, *args.secagg]) - 1
    t = args.targets
    people = _people(args, t * (2 + others) + args.distractors, arch)
    companions = [Face(n, imgs[0]) for n, imgs in people[t : 2 * t]]
    pool = [Face(n, imgs[0]) for n, imgs in people[2 * t : t * (2 + others)]]
    gallery = {n: imgs[1:] for n, imgs in people[:t]}
    gallery.update({n: imgs[:GALLERY_PER_ID] for n, imgs in people[t * (2 + others) :]})
    return Faces(
        targets=[Face(n, imgs[0]) for n, imgs in people[:t]],
        companions=companions,
        bystanders=[pool[i * others : (i + 1) * others] for i in range(t)],
        gallery=gallery,
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(1.0 / mse)


class Judge:
    """dlib's ResNet as the reference recogniser: cosine to the truth and rank-1 against the gallery."""

    def __init__(self, embedder: TorchEmbedder, gallery: dict[str, list[np.ndarray]]) -> None:
        self.embedder = embedder
        self.names = sorted(gallery)
        templates = [self.embed(np.stack(gallery[n])).mean(0) for n in self.names]
        self.templates = np.stack([t / np.linalg.norm(t) for t in templates])

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return self.embedder.embed(pixels)

    def score(self, probe: np.ndarray, truth: np.ndarray, identity: str) -> tuple[float, bool]:
        e = self.embed(np.stack([probe, truth]))
        rank1 = self.names[int(np.argmax(self.templates @ e[0]))] == identity
        return float(e[0] @ e[1]), rank1


def dlib_embedder(args: argparse.Namespace, workdir: Path) -> TorchEmbedder:
    path = Path(args.dlib) if args.dlib else workdir / "dlib-resnet.safetensors"
    if not path.is_file():
        from facefl.importers.cli import import_dlib_resnet

        import_dlib_resnet(path)  # from the installed face_recognition_models package: nothing downloaded
    return TorchEmbedder.from_checkpoint(path, device="cpu", batch_size=32)


def write_strip(path: Path, rows: list[list[np.ndarray]], scale: int = 2) -> None:
    """Rows of faces as one PNG (white gaps), each image enlarged ``scale`` times."""
    size = rows[0][0].shape[0] * scale
    cols = max(len(images) for images in rows)
    canvas = Image.new("RGB", (cols * (size + 2), len(rows) * (size + 2)), (255, 255, 255))
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            tile = Image.fromarray(img).resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(tile, (c * (size + 2), r * (size + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
