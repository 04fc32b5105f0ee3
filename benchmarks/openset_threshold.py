"""Why a phone accepts strangers: the Recognizer's pairwise threshold against an open-set one.

    python benchmarks/openset_threshold.py --model runs/dlib-resnet.safetensors

The Recognizer calibrates its threshold on image-to-image impostor pairs of the enrolled people
(``device_sdk.threshold.calibrate_threshold``), but ``identify`` accepts a stranger's probe when it
reaches any one of the enrolled templates. This replays ``benchmarks/recognizer_celeba.py``'s phones
(the same draw of enrolled people and strangers, the same enrollment split, the Recognizer's templates
and calibration), in NumPy on embeddings computed once, and compares two thresholds:

- ``pairwise``: the Recognizer's own (falling back to ``--fallback`` when the gallery is too small);
- ``open-set``: the Recognizer's rule with a stranger bank (``device_sdk.threshold.open_set_threshold``):
  at most ``--far`` of a public stranger set's probes (``--public`` images of the LFW public split, spread
  over identities as ``facefl export --threshold-set`` takes them and stores them as the model's bank)
  reach their best template: the rate ``identify`` actually has for strangers.

Reported per threshold, mean +- std over phones: the share of enrolled people's test images identified
correctly above the threshold, and the share of strangers' images rejected. ``--exclude`` leaves folders
out of the draw (default: ``accuracy.EXCLUDED_IDENTITIES``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from accuracy import EXCLUDED_IDENTITIES  # noqa: E402
from recognizer_celeba import eligible_identities, phone_people  # noqa: E402


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a facefl checkpoint or ONNX model")
    p.add_argument("--celeba", type=Path, default=SHARED / "celeba")
    p.add_argument("--lfw", type=Path, default=SHARED / "lfw", help="LFW layout: its public split is used")
    p.add_argument("--phones", type=int, default=10)
    p.add_argument("--people", type=int, default=10)
    p.add_argument("--strangers", type=int, default=30)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--far", type=float, default=1e-3)
    p.add_argument("--public", type=int, default=2000, help="public stranger images (2000)")
    p.add_argument("--fallback", type=float, default=0.9256, help="the model's stored threshold")
    p.add_argument("--exclude", default=",".join(EXCLUDED_IDENTITIES))
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "openset_threshold.json")
    args = p.parse_args(argv)

    from device_sdk.threshold import calibrate_threshold, open_set_threshold
    from export.threshold import embed_public_set
    from facefl.data import ImageFolder
    from facefl.data.protocol import device_split, load_identities
    from facefl.embedders import load_embedder

    embedder = load_embedder(args.model)
    folder = ImageFolder(args.celeba)
    names = list(folder.identities)
    images, labels = load_identities(args.celeba, names, embedder.image_size)
    emb = embedder.embed(images).astype(np.float64)
    public = embed_public_set(embedder, args.lfw, args.public)[0].astype(np.float64)
    # recognizer_celeba.py's draw
    eligible = eligible_identities(folder, {n for n in args.exclude.split(",") if n})
    phones: list[dict[str, Any]] = []
    for seed in range(args.phones):
        enrolled, others = phone_people(eligible, args.people, args.strangers, seed)
        rows = [np.flatnonzero(labels == names.index(n)) for n in enrolled]
        person = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)])
        flat = np.concatenate(rows)
        train, test = device_split(person, args.test_fraction, seed, identities=enrolled)
        gallery = emb[flat[train]]
        templates = unit(np.stack([gallery[person[train] == k].mean(axis=0) for k in range(len(enrolled))]))
        probes = emb[flat[test]] @ templates.T
        strangers = emb[np.isin(labels, [names.index(n) for n in others])] @ templates.T
        pairwise = calibrate_threshold(gallery, person[train], args.far, args.fallback, "model default")
        open_set = open_set_threshold(public, templates, args.far)
        if open_set is None:
            raise SystemExit(f"--public {len(public)} faces are too few for FAR {args.far}")
        phone: dict[str, Any] = {"seed": seed, "pairwise_source": pairwise.source}
        for key, t in (
            ("pairwise", pairwise.value),
            ("open_set", open_set.value),
        ):
            hit = (probes.argmax(axis=1) == person[test]) & (probes.max(axis=1) >= t)
            phone[key] = {
                "threshold": t,
                "correct": float(hit.mean()),
                "stranger_rejected": float((strangers.max(axis=1) < t).mean()),
            }
        phones.append(phone)
    summary = {
        key: {
            m: {
                "mean": float(np.mean([ph[key][m] for ph in phones])),
                "std": float(np.std([ph[key][m] for ph in phones])),
            }
            for m in ("threshold", "correct", "stranger_rejected")
        }
        for key in ("pairwise", "open_set")
    }
    print(f"{args.people} people per phone, {args.strangers} strangers, {args.phones} phones, FAR {args.far}")
    print("| threshold | value | correct | strangers rejected |\n|---|---:|---:|---:|")
    for key, s in summary.items():
        print(f"| {key} | " + " | ".join(f"{s[m]['mean']:.3f} ± {s[m]['std']:.3f}" for m in s) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "phones": phones},
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
