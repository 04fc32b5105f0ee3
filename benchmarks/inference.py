"""On-device inference, side by side: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

    python benchmarks/inference.py --checkpoint small=/work/ckpt/small.safetensors
    python benchmarks/inference.py --models small --quick --lfw DIR      # tiny counts (the test uses it)

For each backbone (``small`` 64x64, ``mobilefacenet`` 112x112) in one process:
- the model: the ``--checkpoint NAME=FILE`` given, else a random initialisation (marked "untrained":
  latency, size and parity are measured, accuracy is not reported because it would mean nothing);
- export with :mod:`export` (fp32) and static int8 quantization calibrated on ``--calibration`` images
  (default ``../shared/data/celeba``: device-like faces, disjoint from LFW; generated faces if absent);
- latency: median of ``--runs`` timed calls after warm-up, at batch 1 and batch 32, with ``--threads``
  intra-op threads for both PyTorch and ONNX Runtime (default 1: a phone app gets about one core);
- size on disk: the safetensors checkpoint (PyTorch) and the ONNX files;
- parity: cosine between PyTorch and ONNX Runtime embeddings (min / mean) on ``--parity-images`` LFW images;
- accuracy: LFW pair folds 6-10 (``facefl.evaluation``: threshold chosen on the other folds), if trained.
Prints a markdown table and the targets (ORT fp32 >= 3x faster than PyTorch at batch 1; int8 <= 30% of
the fp32 size and <= 0.5 point less accurate), and writes JSON (default
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

SPEEDUP_TARGET = 3.0
INT8_SIZE_TARGET = 0.30
INT8_ACCURACY_LOSS_TARGET = 0.005


def _median_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
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

    torch.set_num_threads(threads)
    module = source.module.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {
        "ort_fp32": ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"]),
        "ort_int8": ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"]),
    }
    rng = np.random.default_rng(0)
    batches = {b: rng.standard_normal((b, 3, size, size)).astype(np.float32) for b in (1, 32)}
    latency: dict[str, dict[str, float]] = {"torch": {}, "ort_fp32": {}, "ort_int8": {}}
    for b, x in batches.items():
        runs_b = runs if b == 1 else max(3, runs // 5)
        xt = torch.from_numpy(x)

        def torch_call(xt: torch.Tensor = xt) -> None:
            with torch.inference_mode():
                module(xt)

        latency["torch"][f"b{b}"] = _median_ms(torch_call, runs_b, warmup=3)
        for key, sess in sessions.items():
            latency[key][f"b{b}"] = _median_ms(
                lambda s=sess, x=x: s.run(None, {"images": x}), runs_b, warmup=3
            )
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

    accuracy: dict[str, Any] = {}
    if trained and lfw is not None and lfw.is_dir():
        vset = VerificationSet.from_dir(lfw, size)
        embedders = {
            "torch": TorchEmbedder(module, name, device="cpu", preprocessing=source.preprocessing),
            "ort_fp32": OnnxEmbedder(fp32, threads=threads),
            "ort_int8": OnnxEmbedder(int8, threads=threads),
        }
        for key, embedder in embedders.items():
            t0 = time.perf_counter()
            accuracy[key] = evaluate_verification(embedder, vset)
            log(f"{name}: {key} {vset.name}: accuracy {accuracy[key]['accuracy']:.4f} "
                f"({time.perf_counter() - t0:.0f}s)")  # fmt: skip
        accuracy["set"] = vset.name
    return {
        "model": name,
        "checkpoint": str(checkpoint) if trained else None,
        "trained": trained,
        "image_size": size,
        "threads": threads,
        "latency_ms": latency,
        "size_bytes": sizes,
        "parity": parity,
        "accuracy": accuracy,
        "calibration_images": len(calib),
        "parity_images": len(probes),
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
    if acc:
        loss = acc["ort_fp32"]["accuracy"] - acc["ort_int8"]["accuracy"]
        out.update(int8_accuracy_loss=loss, int8_accuracy_met=loss <= INT8_ACCURACY_LOSS_TARGET)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | runtime | batch 1 ms | batch 32 ms | size MB | cosine to torch min / mean "
        "| LFW 6-10 acc |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {"torch": "PyTorch eager", "ort_fp32": "ORT fp32", "ort_int8": "ORT int8"}
    for row in rows:
        for key, label in labels.items():
            lat = row["latency_ms"][key]
            par = row["parity"].get(key)
            cos = "1 (reference)" if par is None else f"{par['min_cosine']:.5f} / {par['mean_cosine']:.5f}"
            if not row["trained"]:
                acc = "untrained"
            elif key in row["accuracy"]:
                acc = f"{100 * row['accuracy'][key]['accuracy']:.2f}%"
            else:
                acc = "n/a (no --lfw)"
            lines.append(
                f"| {row['model']} | {label} | {lat['b1']:.3f} | {lat['b32']:.2f} | "
                f"{row['size_bytes'][key] / 1e6:.2f} | {cos} | {acc} |"
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
            f"(target >= {SPEEDUP_TARGET:g}x: {yes(t['speedup_met'])})",
            f"int8 = {100 * t['int8_size_ratio']:.0f}% of fp32 size "
            f"(target <= 30%: {yes(t['int8_size_met'])})",
        ]
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
        "threads": args.threads,
        "runs_batch1": runs,
        "lfw": str(lfw) if lfw else None,
        "calibration": str(calibration) if calibration else "generated faces",
    }
    load = os.getloadavg()[0]
    print(
        f"threads={args.threads} (PyTorch and ONNX Runtime intra-op), median of {runs} runs at batch 1 "
        f"and {max(3, runs // 5)} at batch 32; {os.cpu_count()} CPUs, load average {load:.1f}\n"
    )
    print(format_table(rows))
    print()
    print(format_targets(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
