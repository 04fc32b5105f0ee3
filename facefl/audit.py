"""Label-noise audit of an identity folder: people filed twice, and folders that mix several people.

Evaluation at FAR 1e-3 is decided by the few highest impostor scores, so a single data defect can set
it: a device's person filed again under a second name is an "impostor" that matches perfectly, and a
folder that mixes people makes a template nobody matches well. The audit embeds every image with a model
the user trusts (e.g. the imported dlib-resnet) and flags candidates; a person looks at the contact
sheet (``--sheet``) before excluding anything.

- **Filed twice**: two folders whose mean embeddings are at least as similar as the two halves of one
  folder usually are (``duplicate_threshold``: by default the 5th percentile, over folders with enough
  images, of the cosine between the means of their first and second halves).
- **Mixed**: a folder whose images agree with their own mean unusually little: the median cosine of
  its images to their mean is an outlier by the modified z-score (Iglewicz and Hoaglin: ``z < -3.5``,
  with the median absolute deviation over all folders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facefl.vectors import l2_normalize

__all__ = [
    "AuditReport",
    "audit_identities",
    "class_means",
    "folder_purity",
    "split_half_similarity",
]

MIN_IMAGES = 4  # a folder needs this many images for its split-half similarity and its purity
MIXED_Z = -3.5  # the modified z-score's usual outlier cut (Iglewicz and Hoaglin, 1993)


@dataclass
class AuditReport:
    duplicate_threshold: float
    # (folder a, folder b, cosine of their means), most similar first
    duplicates: list[tuple[str, str, float]] = field(default_factory=list)
    # (folder, median cosine of its images to their mean, modified z-score), least pure first
    mixed: list[tuple[str, float, float]] = field(default_factory=list)

    def flagged(self) -> list[str]:
        """Every flagged folder, once, in the order above."""
        names = [n for a, b, _ in self.duplicates for n in (a, b)] + [n for n, _, _ in self.mixed]
        return list(dict.fromkeys(names))

    def to_json(self) -> dict[str, Any]:
        return {
            "duplicate_threshold": self.duplicate_threshold,
            "duplicates": [{"a": a, "b": b, "cosine": c} for a, b, c in self.duplicates],
            "mixed": [{"folder": n, "purity": p, "z": z} for n, p, z in self.mixed],
        }


def class_means(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels present, in increasing order; the unit mean of each one's unit embeddings)."""
    unit = l2_normalize(np.asarray(embeddings, dtype=np.float64), dtype=np.float64)
    ids, inverse = np.unique(np.asarray(labels), return_inverse=True)
    sums = np.zeros((ids.size, unit.shape[1]))
    np.add.at(sums, inverse, unit)
    return ids, l2_normalize(sums, dtype=np.float64)


def split_half_similarity(
    embeddings: np.ndarray, labels: np.ndarray, min_images: int = MIN_IMAGES
) -> np.ndarray:
    """Per folder with >= ``min_images`` images: the cosine between the means of its first and second
    halves (in the given order): how similar two means of one person are."""
    unit = l2_normalize(np.asarray(embeddings, dtype=np.float64), dtype=np.float64)
    labels = np.asarray(labels)
    out = []
    for identity in np.unique(labels):
        rows = np.flatnonzero(labels == identity)
        if rows.size < min_images:
            continue
        half = rows.size // 2
        a, b = unit[rows[:half]].mean(axis=0), unit[rows[half:]].mean(axis=0)
        out.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return np.asarray(out)


def folder_purity(
    embeddings: np.ndarray, labels: np.ndarray, min_images: int = MIN_IMAGES
) -> dict[int, float]:
    """label -> median cosine of the folder's images to the folder's mean (folders with enough images)."""
    unit = l2_normalize(np.asarray(embeddings, dtype=np.float64), dtype=np.float64)
    labels = np.asarray(labels)
    ids, means = class_means(unit, labels)
    out = {}
    for identity, mean in zip(ids, means, strict=True):
        rows = np.flatnonzero(labels == identity)
        if rows.size >= min_images:
            out[int(identity)] = float(np.median(unit[rows] @ mean))
    return out


def audit_identities(
    embeddings: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    duplicate_threshold: float | None = None,
    min_images: int = MIN_IMAGES,
) -> AuditReport:
    """Flag folders filed twice and mixed folders (module docstring). ``labels`` index ``names``."""
    emb = np.asarray(embeddings)
    labels = np.asarray(labels)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError("embeddings must be (N, D) and labels (N,)")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or infinite values")
    if duplicate_threshold is None:
        halves = split_half_similarity(emb, labels, min_images)
        if halves.size < 2:
            raise ValueError(f"need at least two folders with >= {min_images} images to set the threshold")
        duplicate_threshold = float(np.percentile(halves, 5))
    ids, means = class_means(emb, labels)
    sim = means @ means.T
    a, b = np.triu_indices(ids.size, k=1)
    close = sim[a, b] >= duplicate_threshold
    duplicates = sorted(
        (
            (names[int(ids[i])], names[int(ids[j])], float(sim[i, j]))
            for i, j in zip(a[close], b[close], strict=True)
        ),
        key=lambda t: -t[2],
    )
    purity = folder_purity(emb, labels, min_images)
    values = np.array(list(purity.values()))
    mixed: list[tuple[str, float, float]] = []
    if values.size >= 3:
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        if mad > 0:
            for identity, p in purity.items():
                z = 0.6745 * (p - median) / mad
                if z < MIXED_Z:
                    mixed.append((names[identity], p, float(z)))
    mixed.sort(key=lambda t: t[2])
    return AuditReport(duplicate_threshold, duplicates, mixed)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: Any) -> None:
    p.add_argument("data", help="an image folder: one sub-folder of aligned faces per identity")
    p.add_argument(
        "--model", required=True, help="a facefl checkpoint (.safetensors) or ONNX embedding model"
    )
    p.add_argument("--json", dest="json_path", help="write the report as JSON here")
    p.add_argument("--sheet", help="a PNG contact sheet of every flagged folder (a row of images each)")
    p.add_argument("--threshold", type=float, default=None, help="duplicate cosine (default: from the data)")


def run(args: Any) -> int:
    import json
    import sys

    from facefl.data import DataError, ImageFolder
    from facefl.data.protocol import load_identities
    from facefl.embedders import load_embedder

    try:
        embedder = load_embedder(args.model)
        folder = ImageFolder(args.data)
        names = list(folder.identities)
        images, labels = load_identities(args.data, names, embedder.image_size)
        report = audit_identities(embedder.embed(images), labels, names, args.threshold)
        if args.sheet:
            _contact_sheet(folder, report.flagged(), Path(args.sheet))
    except (DataError, ValueError, OSError) as exc:
        print(f"facefl audit-data: error: {exc}", file=sys.stderr)
        return 1
    print(f"duplicate threshold (cosine of folder means): {report.duplicate_threshold:.4f}")
    for a, b, c in report.duplicates:
        print(f"filed twice? {a} {b}  cosine {c:.4f}")
    for n, p, z in report.mixed:
        print(f"mixed?       {n}  purity {p:.4f}  z {z:.1f}")
    if not report.duplicates and not report.mixed:
        print("nothing flagged")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


def _contact_sheet(folder: Any, names: list[str], path: Path, per_row: int = 12, size: int = 80) -> None:
    from PIL import Image, ImageDraw

    from facefl.data import load_image

    sheet = Image.new("RGB", (size * (per_row + 1), size * max(1, len(names))), "white")
    draw = ImageDraw.Draw(sheet)
    by_name: dict[str, list[Path]] = {}
    for file, label in folder.samples:
        by_name.setdefault(folder.identities[label], []).append(Path(file))
    for row, name in enumerate(names):
        draw.text((4, row * size + size // 2 - 6), name, fill="black")
        for col, file in enumerate(sorted(by_name[name])[:per_row]):
            face = Image.fromarray(load_image(file)).resize((size, size))
            sheet.paste(face, ((col + 1) * size, row * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
