"""On-device inference, side by side: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

    python benchmarks/inference.py --checkpoint small=/work/ckpt/small.safetensors
    python benchmarks/inference.py --models small --quick --lfw DIR      # tiny counts (the test uses it)

    python benchmarks/inference.py --models dlib-resnet --checkpoint dlib-resnet=dlib.safetensors

For each backbone (``small`` 64x64, ``mobilefacenet`` 112x112, ``dlib-resnet`` 150x150) in one process:
- the model: the ``--checkpoint NAME=FILE`` given, else a random initialisation (marked "untrained":
  latency, size and parity are measured, accuracy is not reported because it would mean nothing);
- export with :mod:`export` (fp32) and static int8 quantization calibrated on ``--calibration`` images
  (default ``../shared/data/celeba``: device-like faces, disjoint from LFW; generated faces if absent);
- latency: median of ``--runs`` timed calls after warm-up (mean +- std of the medians over ``--repeats``
  rounds, each timing every runtime in turn), at batch 1 and batch 32, on real face crops; also the
  median process CPU time per call (what the call costs on an idle core: every runtime here computes on
  one thread, and unlike wall time it is not inflated when other jobs preempt the benchmark)
  (LFW, else generated faces; already preprocessed: preprocessing is timed apart as ``preprocess``), with
  ``--threads`` intra-op threads for both PyTorch and ONNX Runtime (default 1: a phone app gets about one
  core);
- ``dlib-resnet`` only: dlib itself as the anchor (``dlib.face_recognition_model_v1(dat)
  .compute_face_descriptor(chip)`` on the same 150x150 uint8 RGB crops, its own normalisation included;
  batch 32 through its list overload). dlib's Python wheel has no BLAS and no OpenMP: it computes on the
  calling thread. Each runtime's process CPU time over wall time during its timed calls is recorded
  (``cpu_per_wall``: about 1 for a runtime on one core); run the whole benchmark under ``taskset -c 0``
  to pin every runtime to one core;
- size on disk: the safetensors checkpoint (PyTorch) and the ONNX files;
- parity: cosine between PyTorch and ONNX Runtime embeddings (min / mean) on ``--parity-images`` LFW images;
- accuracy: LFW pair folds 6-10 (``facefl.evaluation``: threshold chosen on the other folds) and
  TAR@FAR=1e-3 over those pairs, if trained (dlib itself with ``--dlib-accuracy``: slow on one thread).
Prints a markdown table and the targets (ORT fp32 >= 3x faster than PyTorch at batch 1; for dlib-resnet
also >= 2x faster than dlib; int8 <= 30% of the fp32 size and <= 0.5 point less accurate), and writes JSON
(default
``benchmarks/results/inference.json``). Numbers from a shared CPU are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from facefl.vectors import l2_normalize  # noqa: E402

SPEEDUP_TARGET = 3.0
DLIB_SPEEDUP_TARGET = 2.0
INT8_SIZE_TARGET = 0.30
INT8_ACCURACY_LOSS_TARGET = 0.005


#: CPU time of the process over wall time during each runtime's timed calls (key -> batch -> ratio): a
#: runtime that used more than one core shows > 1 (measured, not configured: dlib has no thread setting).
CPU_PER_WALL: dict[str, dict[str, float]] = {}
#: Median process CPU time per call, ms (key -> batch -> one value per round): unlike wall time, not
#: inflated when other processes preempt the benchmark on a shared machine (every runtime here computes
#: on one thread, so CPU time is its latency on an idle core).
CPU_MS: dict[str, dict[str, list[float]]] = {}


def _median_ms(
    fn: Callable[[], Any], runs: int, warmup: int, cpu_key: tuple[str, str] | None = None
) -> float:
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if cpu_key is not None:
        ratio = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
        CPU_PER_WALL.setdefault(cpu_key[0], {})[cpu_key[1]] = ratio
        CPU_MS.setdefault(cpu_key[0], {}).setdefault(cpu_key[1], []).append(
            statistics.median(cpu_times) * 1e3
        )
    return statistics.median(times) * 1000.0


def _images_for(root: Path | None, size: int, limit: int, seed: int) -> np.ndarray:
    from export.images import load_image_dir
    from facefl.data import synthetic_identity_images

    if root is not None and root.is_dir():
        return load_image_dir(root, size, limit=limit)
    per = 4
    return np.concatenate(
        [synthetic_identity_images(k, per, size, seed) for k in range(max(1, -(-limit // per)))]
    )[:limit]


class DlibEmbedder:
    """dlib's own face descriptor (``compute_face_descriptor``) behind facefl's Embedder protocol."""

    def __init__(self, dat: Path, image_size: int) -> None:
        import dlib

        from facefl.data import Preprocessing

        self.model = dlib.face_recognition_model_v1(str(dat))
        self.preprocessing = Preprocessing(image_size)  # resizing only: dlib normalises on its own

    def descriptors(self, chips: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self.model.compute_face_descriptor(chips), np.float32)

    def embed(self, images: Any) -> np.ndarray:
        out = []
        for lo in range(0, len(images), 32):
            chips = [np.ascontiguousarray(self.preprocessing.to_uint8(im)) for im in images[lo : lo + 32]]
            out.append(self.descriptors(chips))
        emb = np.concatenate(out)
        return l2_normalize(emb)


def _dlib_info() -> dict[str, Any] | None:
    try:
        import dlib
    except ImportError:
        return None
    return {
        "version": dlib.__version__,
        "avx": bool(dlib.USE_AVX_INSTRUCTIONS),
        "blas": bool(dlib.DLIB_USE_BLAS),
        "cuda": bool(dlib.DLIB_USE_CUDA),
    }


def bench_model(
    name: str,
    checkpoint: Path | None,
    work: Path,
    *,
    lfw: Path | None,
    calibration: Path | None,
    threads: int,
    runs: int,
    parity_images: int,
    log: Callable[[str], None],
    dlib_accuracy: bool = False,
    repeats: int = 1,
    accuracy_on: bool = True,
) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from export.onnx import export_onnx, load_generic
    from export.parity import parity_report
    from export.quantize import quantize_static_int8
    from facefl.checkpoint import save_checkpoint
    from facefl.embedders import OnnxEmbedder, TorchEmbedder
    from facefl.evaluation import VerificationSet, evaluate_verification
    from facefl.models import build_backbone

    trained = checkpoint is not None
    if checkpoint is None:  # an untrained model still has a size, a latency and a parity
        checkpoint = save_checkpoint(
            work / f"{name}.untrained.safetensors", build_backbone(name, seed=0), name
        )
    source = load_generic(checkpoint)
    if source.architecture != name:
        raise SystemExit(f"--checkpoint {name}=... is a {source.architecture!r} checkpoint")
    size = source.preprocessing.image_size
    fp32 = export_onnx(source, work / f"{name}.onnx")
    calib = _images_for(calibration, size, 200, seed=1)
    t0 = time.perf_counter()
    int8 = quantize_static_int8(fp32, work / f"{name}.int8.onnx", calib)
    log(f"{name}: exported and quantized ({len(calib)} calibration images, {time.perf_counter() - t0:.0f}s)")

    dlib_model: DlibEmbedder | None = None
    dat: Path | None = None
    if name == "dlib-resnet":
        try:
            from facefl.importers.dlib_dat import find_model_file

            dat = find_model_file()
            dlib_model = DlibEmbedder(dat, size)
        except Exception as exc:  # dlib or its model file missing: the anchor rows are left out
            log(f"{name}: no dlib anchor ({exc})")

    torch.set_num_threads(threads)
    module = source.module.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {
        "ort_fp32": ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"]),
        "ort_int8": ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"]),
    }
    # the same real face crops for every runtime (uint8 for dlib, preprocessed for the others)
    crops = _images_for(lfw, size, 32, seed=3)
    crops = np.concatenate([crops] * -(-32 // len(crops)))[:32]
    batches = {b: source.preprocessing.batch(crops[:b]) for b in (1, 32)}
    keys = ["torch", "ort_fp32", "ort_int8"] + (["dlib"] if dlib_model is not None else [])
    medians: dict[str, dict[str, list[float]]] = {k: {"b1": [], "b32": []} for k in keys}
    preprocess_ms: dict[str, float] = {}
    # ``repeats`` rounds, each timing every runtime in turn: load drift on a shared machine then hits all
    # runtimes alike, and the spread over rounds is reported
    for _ in range(repeats):
        for b, x in batches.items():
            runs_b = runs if b == 1 else max(3, runs // 5)
            xt = torch.from_numpy(x)

            def torch_call(xt: torch.Tensor = xt) -> None:
                with torch.inference_mode():
                    module(xt)

            medians["torch"][f"b{b}"].append(
                _median_ms(torch_call, runs_b, warmup=3, cpu_key=(f"{name}/torch", f"b{b}"))
            )
            for key, sess in sessions.items():
                medians[key][f"b{b}"].append(
                    _median_ms(
                        lambda s=sess, x=x: s.run(None, {"images": x}),
                        runs_b,
                        warmup=3,
                        cpu_key=(f"{name}/{key}", f"b{b}"),
                    )
                )
            if dlib_model is not None:
                chips = [np.ascontiguousarray(c) for c in crops[:b]]
                model = dlib_model.model
                # batch 1: the single-image overload; batch 32: the list overload
                arg: Any = chips[0] if b == 1 else chips

                def call(model: Any = model, arg: Any = arg) -> None:
                    model.compute_face_descriptor(arg)

                medians["dlib"][f"b{b}"].append(
                    _median_ms(call, runs_b, warmup=3, cpu_key=(f"{name}/dlib", f"b{b}"))
                )
            preprocess_ms[f"b{b}"] = _median_ms(
                lambda b=b: source.preprocessing.batch(crops[:b]), runs_b, warmup=1
            )
    latency = {k: {b: statistics.mean(v) for b, v in per.items()} for k, per in medians.items()}
    latency_std = {
        k: {b: statistics.stdev(v) if len(v) > 1 else 0.0 for b, v in per.items()}
        for k, per in medians.items()
    }
    log(f"{name}: latency (ms) " + json.dumps(latency))

    probes = _images_for(lfw, size, parity_images, seed=2)
    parity = {
        key: parity_report(module, source.preprocessing, path, probes, threads=threads).to_dict()
        for key, path in (("ort_fp32", fp32), ("ort_int8", int8))
    }
    sizes = {
        "torch": checkpoint.stat().st_size,
        "ort_fp32": fp32.stat().st_size,
        "ort_int8": int8.stat().st_size,
    }
    if dlib_model is not None and dat is not None:
        torch_emb = TorchEmbedder(module, name, device="cpu", preprocessing=source.preprocessing).embed(
            probes
        )
        cos = np.sum(torch_emb * dlib_model.embed(probes), axis=1)
        parity["dlib"] = {
            "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()),
            "images": len(cos),
        }
        sizes["dlib"] = dat.stat().st_size

    accuracy: dict[str, Any] = {}
    if trained and accuracy_on and lfw is not None and lfw.is_dir():
        vset = VerificationSet.from_dir(lfw, size)
        embedders: dict[str, Any] = {
            "torch": TorchEmbedder(module, name, device="cpu", preprocessing=source.preprocessing),
            "ort_fp32": OnnxEmbedder(fp32, threads=threads),
            "ort_int8": OnnxEmbedder(int8, threads=threads),
        }
        if dlib_model is not None and dlib_accuracy:
            embedders["dlib"] = dlib_model
        for key, embedder in embedders.items():
            t0 = time.perf_counter()
            accuracy[key] = evaluate_verification(embedder, vset)
            rep = accuracy[key]
            log(f"{name}: {key} {vset.name}: accuracy {rep['accuracy']:.4f}, "
                f"TAR@FAR=1e-3 {rep['tar@far=1e-3']:.4f} ({time.perf_counter() - t0:.0f}s)")  # fmt: skip
        accuracy["set"] = vset.name
    return {
        "model": name,
        "checkpoint": str(checkpoint) if trained else None,
        "trained": trained,
        "image_size": size,
        "threads": threads,
        "latency_ms": latency,
        "latency_std_ms": latency_std,
        "latency_repeats_ms": medians,
        "preprocess_ms": preprocess_ms,
        "size_bytes": sizes,
        "parity": parity,
        "accuracy": accuracy,
        "accuracy_skipped": not accuracy_on,
        "calibration_images": len(calib),
        "parity_images": len(probes),
        "cpu_per_wall": {k.split("/", 1)[1]: v for k, v in CPU_PER_WALL.items() if k.startswith(f"{name}/")},
        "cpu_ms": {
            k.split("/", 1)[1]: {b: statistics.mean(v) for b, v in per.items()}
            for k, per in CPU_MS.items()
            if k.startswith(f"{name}/")
        },
        "cpu_ms_std": {
            k.split("/", 1)[1]: {b: statistics.stdev(v) if len(v) > 1 else 0.0 for b, v in per.items()}
            for k, per in CPU_MS.items()
            if k.startswith(f"{name}/")
        },
        **({"dlib_model": str(dat)} if dlib_model is not None else {}),
    }


def targets(row: dict[str, Any]) -> dict[str, Any]:
    lat, sizes, acc = row["latency_ms"], row["size_bytes"], row["accuracy"]
    speedup = lat["torch"]["b1"] / lat["ort_fp32"]["b1"]
    size_ratio = sizes["ort_int8"] / sizes["ort_fp32"]
    out: dict[str, Any] = {
        "ort_fp32_speedup_b1": speedup,
        "speedup_met": speedup >= SPEEDUP_TARGET,
        "int8_size_ratio": size_ratio,
        "int8_size_met": size_ratio <= INT8_SIZE_TARGET,
    }
    cpu = row.get("cpu_ms", {})
    if "torch" in cpu and "ort_fp32" in cpu:
        out["ort_fp32_cpu_speedup_b1"] = cpu["torch"]["b1"] / cpu["ort_fp32"]["b1"]
    if "dlib" in lat:
        dlib_speedup = lat["dlib"]["b1"] / lat["ort_fp32"]["b1"]
        out.update(
            ort_fp32_speedup_vs_dlib_b1=dlib_speedup, dlib_speedup_met=dlib_speedup >= DLIB_SPEEDUP_TARGET
        )
        if "dlib" in cpu and "ort_fp32" in cpu:
            out["ort_fp32_cpu_speedup_vs_dlib_b1"] = cpu["dlib"]["b1"] / cpu["ort_fp32"]["b1"]
    if acc:
        loss = acc["ort_fp32"]["accuracy"] - acc["ort_int8"]["accuracy"]
        out.update(int8_accuracy_loss=loss, int8_accuracy_met=loss <= INT8_ACCURACY_LOSS_TARGET)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | runtime | batch 1 ms/face | batch 32 ms/face | batch 1 CPU ms/face | batch 32 CPU ms/face "
        "| size MB | cosine to torch min / mean | LFW 6-10 acc | LFW 6-10 TAR@FAR=1e-3 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "dlib": "dlib (anchor)",
        "torch": "PyTorch eager",
        "ort_fp32": "ORT fp32",
        "ort_int8": "ORT int8",
    }
    for row in rows:
        for key, label in labels.items():
            if key not in row["latency_ms"]:
                continue
            lat = row["latency_ms"][key]
            par = row["parity"].get(key)
            cos = "1 (reference)" if par is None else f"{par['min_cosine']:.5f} / {par['mean_cosine']:.5f}"
            if not row["trained"]:
                acc = tar = "untrained"
            elif row.get("accuracy_skipped"):
                acc = tar = "not run"
            elif key in row["accuracy"]:
                acc = f"{100 * row['accuracy'][key]['accuracy']:.2f}%"
                tar = f"{row['accuracy'][key]['tar@far=1e-3']:.4f}"
            else:
                acc = tar = "n/a (no --lfw)" if key != "dlib" else "n/a (--dlib-accuracy)"
            std = row.get("latency_std_ms", {}).get(key, {"b1": 0.0, "b32": 0.0})
            cpu = row.get("cpu_ms", {}).get(key, {"b1": float("nan"), "b32": float("nan")})
            cpu_std = row.get("cpu_ms_std", {}).get(key, {"b1": 0.0, "b32": 0.0})
            lines.append(
                f"| {row['model']} | {label} | {lat['b1']:.2f} +- {std['b1']:.2f} | "
                f"{lat['b32'] / 32:.2f} +- {std['b32'] / 32:.2f} | "
                f"{cpu['b1']:.2f} +- {cpu_std['b1']:.2f} | "
                f"{cpu['b32'] / 32:.2f} +- {cpu_std['b32'] / 32:.2f} | "
                f"{row['size_bytes'][key] / 1e6:.2f} | {cos} | {acc} | {tar} |"
            )
    return "\n".join(lines)


def format_targets(rows: list[dict[str, Any]]) -> str:
    def yes(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    for row in rows:
        t = row["targets"]
        parts = [
            f"ORT fp32 {t['ort_fp32_speedup_b1']:.1f}x faster than PyTorch at batch 1 "
            f"(target >= {SPEEDUP_TARGET:g}x: {yes(t['speedup_met'])}; in CPU time "
            f"{t.get('ort_fp32_cpu_speedup_b1', float('nan')):.1f}x)",
            f"int8 = {100 * t['int8_size_ratio']:.0f}% of fp32 size "
            f"(target <= 30%: {yes(t['int8_size_met'])})",
        ]
        if "ort_fp32_speedup_vs_dlib_b1" in t:
            parts.insert(
                1,
                f"ORT fp32 {t['ort_fp32_speedup_vs_dlib_b1']:.2f}x faster than dlib at batch 1 "
                f"(target >= {DLIB_SPEEDUP_TARGET:g}x: {yes(t['dlib_speedup_met'])}; in CPU time "
                f"{t.get('ort_fp32_cpu_speedup_vs_dlib_b1', float('nan')):.2f}x)",
            )
        if "int8_accuracy_loss" in t:
            parts.append(
                f"int8 accuracy loss {100 * t['int8_accuracy_loss']:+.2f} points "
                f"(target <= 0.5: {yes(t['int8_accuracy_met'])})"
            )
        else:
            parts.append("int8 accuracy loss not measured (untrained or no LFW)")
        lines.append(f"- {row['model']}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default="small,mobilefacenet", help="comma-separated backbones")
    parser.add_argument(
        "--checkpoint", action="append", default=[], metavar="NAME=FILE", help="trained checkpoint of a model"
    )
    parser.add_argument("--lfw", type=Path, default=SHARED / "lfw", help="LFW-layout dir (pairs.txt)")
    parser.add_argument("--calibration", type=Path, default=SHARED / "celeba", help="int8 calibration images")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes (1)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs at batch 1 (batch 32: runs / 5)")
    parser.add_argument("--parity-images", type=int, default=300, help="LFW images for the parity cosines")
    parser.add_argument(
        "--dlib-accuracy", action="store_true", help="dlib-resnet: also dlib's own LFW accuracy (slow)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="latency rounds (mean +- std of their medians; 3)"
    )
    parser.add_argument("--no-accuracy", action="store_true", help="skip the LFW accuracy (latency only)")
    parser.add_argument("--quick", action="store_true", help="tiny counts (tests)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    args = parser.parse_args(argv)

    checkpoints: dict[str, Path] = {}
    for item in args.checkpoint:
        name, sep, file = item.partition("=")
        if not sep or not Path(file).is_file():
            parser.error(f"--checkpoint expects NAME=FILE with an existing file, got {item!r}")
        checkpoints[name] = Path(file)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    runs, parity_images = (5, 16) if args.quick else (args.runs, args.parity_images)
    lfw = args.lfw if args.lfw.is_dir() else None
    calibration = args.calibration if args.calibration.is_dir() else None

    import onnxruntime as ort
    import torch

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="facefl-bench-") as tmp:
        for name in models:
            row = bench_model(
                name,
                checkpoints.get(name),
                Path(tmp),
                lfw=lfw,
                calibration=calibration,
                threads=args.threads,
                runs=runs,
                parity_images=parity_images,
                log=log,
                dlib_accuracy=args.dlib_accuracy,
                repeats=1 if args.quick else args.repeats,
                accuracy_on=not args.no_accuracy,
            )
            row["targets"] = targets(row)
            rows.append(row)
    env = {
        "cpu_count": os.cpu_count(),
        "load_avg_end": os.getloadavg(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "dlib": _dlib_info(),
        "threads": args.threads,
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "runs_batch1": runs,
        "repeats": 1 if args.quick else args.repeats,
        "lfw": str(lfw) if lfw else None,
        "calibration": str(calibration) if calibration else "generated faces",
    }
    load = os.getloadavg()[0]
    print(
        f"threads={args.threads} (PyTorch and ONNX Runtime intra-op), median of {runs} runs at batch 1 "
        f"and {max(3, runs // 5)} at batch 32 (per face: the batch time / 32), mean +- std over "
        f"{1 if args.quick else args.repeats} rounds; {os.cpu_count()} CPUs, "
        f"affinity {env['cpu_affinity']}, load average {load:.1f}\n"
    )
    print(format_table(rows))
    print()
    print(format_targets(rows))
    for row in rows:
        ratios = ", ".join(f"{k} {v['b1']:.2f}/{v['b32']:.2f}" for k, v in row["cpu_per_wall"].items())
        print(f"- {row['model']}: process CPU time / wall time while timing (batch 1 / batch 32): {ratios}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
