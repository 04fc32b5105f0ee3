"""The on-device Recognizer on CelebA "phones": enroll people, identify their other photos and strangers.

    python benchmarks/recognizer_celeba.py --model dlib.safetensors            # exports fp32 + int8 itself
    python benchmarks/recognizer_celeba.py --onnx a.onnx --onnx b.onnx         # already exported models

The models are exported with the real command, ``facefl export --model CKPT --out X.onnx --threshold-set
LFW`` (and ``--int8 --calibration CELEBA`` for the int8 variant), so each carries a stranger bank of
2,000 faces of the LFW public split (never the test folds), on which the Recognizer sets its open-set
threshold, and the operating threshold at FAR 1e-3 chosen on them (the fallback without a bank).

A phone (``--phones`` of them per gallery size, seeds 0, 1, ...) enrolls ``--people`` CelebA identities
drawn at random among those with two or more images; each person's images split into enrollment and test
images with ``facefl.data.protocol.device_split`` (the simulator's split, keyed on the identity name,
``--test-fraction`` of them for test, at least one enrolled). ``--strangers`` other identities (never
enrolled on that phone, all their images) are the impostor probes. For every phone, through
``device_sdk.Recognizer`` (enroll, then ``identify_many``):

- correct: share of the enrolled people's test images identified as the right person;
- wrong: share identified as someone else enrolled (a false accept of another person);
- stranger rejected: share of the strangers' images for which ``identify`` returns no one;
- the threshold in force and its source ("strangers" when set on the model's bank; without one,
  "model default" when the gallery has fewer impostor pairs than ``1 / target_far``, else "calibrated").

Reported as mean +- std over phones. The int8 model is calibrated on the first 200 images of ``--celeba``
(unlabelled, as a phone would calibrate on its own gallery), so they may include the phones' people.

``--raw-photos DIR`` (``<person>/<photo>.jpg``, ordinary photos) also runs the Recognizer on photos through
``device_sdk.align.FaceAligner`` (dlib's HOG detector + 5-point alignment, as ``align=True`` does): each
person in turn is the stranger while the others enroll their first ``--raw-enroll`` aligned photos; the
enrolled people's other photos are identified and the stranger's photos should be rejected (see
:func:`raw_photos`). Writes a markdown table to stdout and JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[recognizer] {msg}", file=sys.stderr, flush=True)


def export_models(ckpt: Path, work: Path, lfw: Path, celeba: Path, int8: bool) -> dict[str, Path]:
    """``facefl export`` (fp32, and int8 calibrated on ``celeba``) with ``--threshold-set lfw``."""
    out = {"fp32": work / "model.onnx"}
    cmds = [[sys.executable, "-m", "facefl", "export", "--model", str(ckpt), "--out", str(out["fp32"]),
             "--threshold-set", str(lfw)]]  # fmt: skip
    if int8:
        out["int8"] = work / "model.int8.onnx"
        cmds.append([*cmds[0][:7], str(out["int8"]), "--threshold-set", str(lfw), "--int8",
                     "--calibration", str(celeba)])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for cmd in cmds:
        log(" ".join(cmd))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        print(proc.stdout, file=sys.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"facefl export failed:\n{proc.stderr[-3000:]}")
        log(f"exported in {time.perf_counter() - t0:.0f} s")
    return out


def model_threshold(path: Path) -> float | None:
    import onnx

    from device_sdk.recognizer import DEFAULT_THRESHOLD_KEY

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return float(props[DEFAULT_THRESHOLD_KEY]) if DEFAULT_THRESHOLD_KEY in props else None


def eligible_identities(folder: Any, exclude: Collection[str] = ()) -> list[str]:
    """The identities a phone may draw: those with two or more images, in folder order, less ``exclude``."""
    counts = np.bincount(folder.labels, minlength=len(folder.identities))
    return [name for name, c in zip(folder.identities, counts, strict=True) if c >= 2 and name not in exclude]


def phone_people(eligible: list[str], people: int, strangers: int, seed: int) -> tuple[list[str], list[str]]:
    """Phone ``seed``'s enrolled people and its strangers, drawn from ``eligible``."""
    order = [eligible[int(i)] for i in np.random.default_rng(seed).permutation(len(eligible))]
    return order[:people], order[people : people + strangers]


def run_phone(
    model: Path,
    folder: Any,
    eligible: list[str],
    people: int,
    strangers: int,
    test_fraction: float,
    seed: int,
    work: Path,
) -> dict[str, Any]:
    from device_sdk import Recognizer
    from facefl.data.folder import load_image
    from facefl.data.protocol import device_split

    enrolled, others = phone_people(eligible, people, strangers, seed)
    paths: dict[str, list[Path]] = {}
    for path, label in folder.samples:
        paths.setdefault(folder.identities[label], []).append(path)
    labels = np.concatenate([np.full(len(paths[name]), i) for i, name in enumerate(enrolled)])
    flat = [p for name in enrolled for p in paths[name]]
    train, test = device_split(labels, test_fraction, seed, identities=enrolled)
    store = work / f"gallery-{model.stem}-{people}-{seed}.db"
    store.unlink(missing_ok=True)
    with Recognizer(model, store, threads=1) as rec:
        for i, name in enumerate(enrolled):
            rec.enroll(name, [load_image(flat[k]) for k in train if labels[k] == i])
        info = rec.threshold_info
        results = rec.identify_many([load_image(flat[k]) for k in test])
        truth = [enrolled[int(labels[k])] for k in test]
        stranger_images = [load_image(p) for name in others for p in paths[name]]
        stranger_results = rec.identify_many(stranger_images)
    store.unlink(missing_ok=True)
    correct = sum(r.person == t for r, t in zip(results, truth, strict=True))
    wrong = sum(r.person is not None and r.person != t for r, t in zip(results, truth, strict=True))
    return {
        "seed": seed,
        "people": people,
        "enrolled_images": len(train),
        "test_images": len(test),
        "stranger_identities": len(others),
        "stranger_images": len(stranger_images),
        "correct": correct / len(test),
        "wrong": wrong / len(test),
        "stranger_rejected": sum(r.person is None for r in stranger_results) / len(stranger_results),
        "threshold": info.value,
        "threshold_source": info.source,
        "impostor_pairs": info.impostor_pairs,
    }


def raw_photos(model: Path, root: Path, enroll_per_person: int, work: Path) -> dict[str, Any]:
    """Ordinary photos through ``Recognizer.enroll/identify_many(..., align=True)``: each person in turn is
    the stranger, the others enroll their first ``enroll_per_person`` photos; probes are the enrolled
    people's other photos (identified as the right person?) and the stranger's photos (rejected?). Photos
    in which ``FaceAligner`` does not find exactly one face are counted and left out first (the
    Recognizer refuses a whole enroll call if one photo fails)."""
    from device_sdk import Recognizer
    from device_sdk.align import FaceAligner
    from device_sdk.errors import RecognizerError
    from facefl.data.folder import ImageFolder, load_image

    folder = ImageFolder(root)
    aligner = FaceAligner()
    crops: dict[str, list[Path]] = {}  # the photos that align, per person
    failures: list[str] = []
    for path, label in folder.samples:
        try:
            aligner.align(load_image(path), str(path))
            crops.setdefault(folder.identities[label], []).append(path)
        except RecognizerError as exc:
            failures.append(f"{path.parent.name}/{path.name}: {exc}")
    names = sorted(crops)
    correct = wrong = genuine = rejected = impostor = 0
    sources = set()
    for stranger in names:
        store = work / f"raw-{model.stem}-{stranger}.db"
        store.unlink(missing_ok=True)
        with Recognizer(model, store, threads=1) as rec:
            for name in names:
                if name != stranger and len(crops[name]) > enroll_per_person:
                    rec.enroll(name, crops[name][:enroll_per_person], align=True)
            sources.add(f"{rec.threshold_info.source} {rec.threshold_info.value:.4f}")
            for name in rec.people():
                for r in rec.identify_many(crops[name][enroll_per_person:], align=True):
                    genuine += 1
                    correct += r.person == name
                    wrong += r.person is not None and r.person != name
            for r in rec.identify_many(crops[stranger], align=True):
                impostor += 1
                rejected += r.person is None
        store.unlink(missing_ok=True)
    return {
        "photos": len(folder.samples),
        "aligned": sum(len(v) for v in crops.values()),
        "alignment_failures": failures,
        "people": len(names),
        "enroll_per_person": enroll_per_person,
        "genuine_probes": genuine,
        "correct": correct / max(genuine, 1),
        "wrong": wrong / max(genuine, 1),
        "impostor_probes": impostor,
        "stranger_rejected": rejected / max(impostor, 1),
        "thresholds": sorted(sources),
    }


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | people/phone | phones | test images/phone | correct | wrong person | strangers rejected "
        "| threshold (source) |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for row in rows:
        phones = row["phones"]
        sources = sorted({p["threshold_source"] for p in phones})
        thr = mean_std([p["threshold"] for p in phones])
        lines.append(
            f"| {row['model']} | {row['people']} | {len(phones)} | "
            f"{statistics.mean(p['test_images'] for p in phones):.1f} | "
            f"{mean_std([p['correct'] for p in phones])} | {mean_std([p['wrong'] for p in phones])} | "
            f"{mean_std([p['stranger_rejected'] for p in phones])} | {thr} ({', '.join(sources)}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a facefl checkpoint: exported here (fp32, int8)")
    src.add_argument("--onnx", type=Path, action="append", help="an exported ONNX model (repeatable)")
    p.add_argument("--no-int8", action="store_true", help="with --model: export fp32 only")
    p.add_argument("--lfw", type=Path, default=SHARED / "lfw", help="--threshold-set of the export")
    p.add_argument("--celeba", type=Path, default=SHARED / "celeba", help="the phones' people and strangers")
    p.add_argument("--people", default="3,10", help="people enrolled per phone (comma-separated sizes)")
    p.add_argument("--phones", type=int, default=5, help="phones per size (seeds 0, 1, ...)")
    p.add_argument("--strangers", type=int, default=30, help="stranger identities per phone")
    p.add_argument("--test-fraction", type=float, default=0.3, help="each person's test share")
    p.add_argument("--raw-photos", type=Path, help="ordinary photos <person>/<photo>: align=True too")
    p.add_argument("--raw-enroll", type=int, default=2, help="photos enrolled per person (--raw-photos)")
    p.add_argument("--work", type=Path, help="keep exported models here (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "recognizer_celeba.json")
    args = p.parse_args(argv)

    from facefl.data.folder import ImageFolder

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="facefl-recognizer-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.model is not None:
            models = export_models(args.model, work, args.lfw, args.celeba, int8=not args.no_int8)
        else:
            models = {path.name: path for path in args.onnx}
        folder = ImageFolder(args.celeba)
        eligible = eligible_identities(folder)
        rows: list[dict[str, Any]] = []
        raw: dict[str, Any] = {}
        for key, path in models.items():
            stored = model_threshold(path)
            log(f"{key}: {path.name}, stored threshold {stored}")
            for people in [int(x) for x in args.people.split(",") if x.strip()]:
                phones = []
                for seed in range(args.phones):
                    t0 = time.perf_counter()
                    phone = run_phone(
                        path, folder, eligible, people, args.strangers, args.test_fraction, seed, work
                    )
                    phones.append(phone)
                    log(f"{key} {people} people seed {seed}: {json.dumps(phones[-1])} "
                        f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
                if phones:
                    rows.append(
                        {"model": key, "people": people, "stored_threshold": stored, "phones": phones}
                    )
            if args.raw_photos is not None:
                raw[key] = raw_photos(path, args.raw_photos, args.raw_enroll, work)
                log(f"{key} raw photos: {json.dumps(raw[key])}")
    if rows:
        print(table(rows))
    for key, r in raw.items():
        print(
            f"\n- raw photos ({key}, align=True): {r['aligned']}/{r['photos']} photos aligned; "
            f"{r['people']} people, each in turn the stranger, {r['enroll_per_person']} enrolled each: "
            f"correct {r['correct']:.3f}, wrong {r['wrong']:.3f} over {r['genuine_probes']} genuine probes; "
            f"strangers rejected {r['stranger_rejected']:.3f} over {r['impostor_probes']} probes; "
            f"threshold {', '.join(r['thresholds'])}"
        )
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "raw_photos": raw,
        "wall_s": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {args.json} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
