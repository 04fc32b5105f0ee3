#!/usr/bin/env python
"""What compressed updates cost in accuracy: FedAvg runs that differ only in ``policy.update_encoding``.

    python benchmarks/compression_accuracy.py --pretrained runs/small.safetensors [--seeds 0,1,2]
        [--encodings float32,float16,int8,int8+ef,int8_channel] [--rounds 3] [--json PATH]

Each run is ``facefl simulate`` (simulator.simulate) against a real uvicorn server on SQLite, in the
setting of ``benchmarks/accuracy.py --profile cpu``'s FedAvg row (the README's accuracy table): the
``small`` model from the same pretrained checkpoint, 30 CelebA devices x 8 identities (30% of each
identity's images kept off training), 1 local epoch per round, lr 0.01, batch 32; 3 rounds by default
(the profile has 5: on a shared 2-core machine 3 keep the whole study within the hour, and the reference
run's LFW accuracy moves from its first round on). The final global model is downloaded and evaluated on
LFW pair folds 6-10 here (facefl.evaluation, the code the server's evaluation uses; the images are decoded
once for all runs) rather than by the server after every round. The encodings are float32 (the
reference), float16, int8 (a scale per tensor), int8_channel (a scale per output channel); ``+ef`` adds
the task's error feedback. Every encoding runs with the same seeds (a seed fixes the devices'
identities, the schedule and the local training), so differences are paired per seed.

Reported per encoding: bytes per upload (the stored size of every accepted update, from the server's round
participants), LFW accuracy and TAR@FAR=1e-2 of the final global model (mean +- std over seeds), and the
paired change of LFW accuracy against float32 (mean +- std over seeds), and how far the final model is
from float32's of the same seed: ||w - w_float32|| / ||w_float32 - w_pretrained|| (the share of what
training moved the model by that the encoding changed), over all float tensors and over the weights
int8 quantizes (tensors of two or more dimensions). A change counts only beyond the
spread of repeated runs: the table says "within spread" when its magnitude is no larger than the larger of
the float32 runs' standard deviation and the paired changes' standard deviation.
Results (every run, then the summary) go to --json after each run, so an interrupted run keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.accuracy import PROFILES, SHARED  # noqa: E402
from benchmarks.server_throughput import git_commit  # noqa: E402
from facefl.checkpoint import load_checkpoint  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "compression_accuracy.json"
ENCODINGS = ("float32", "float16", "int8", "int8+ef", "int8_channel", "int8_channel+ef")
ADMIN = "bench-admin-token"
SPREAD_NOTE = {True: " (within spread)", False: "", None: " (one seed: spread unknown)"}
SECRET = "bench-enrollment-secret"


def log(msg: str) -> None:
    print(f"[compression_accuracy] {msg}", file=sys.stderr, flush=True)


def parse_encoding(name: str) -> tuple[str, bool]:
    """``int8+ef`` -> ("int8", error feedback on)."""
    encoding, _, suffix = name.partition("+")
    return encoding, suffix == "ef"


def run_one(
    name: str, seed: int, args: argparse.Namespace, lfw: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One federated run; its record and the final global model's weights."""
    import httpx

    from device_sdk import AdminClient
    from simulator import SimulationConfig, simulate
    from simulator.server import LocalServer

    profile = PROFILES["cpu"]
    encoding, feedback = parse_encoding(name)
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="facefl-compression-") as tmp,
        LocalServer(Path(tmp) / "server", admin_token=ADMIN, enrollment_secret=SECRET) as server,
    ):
        result = simulate(
            SimulationConfig(
                devices=profile.devices,
                rounds=args.rounds,
                model=profile.model,
                data=str(args.devices_data),
                ids_per_device=profile.ids_per_device,
                heldout_ids=profile.heldout_ids,
                test_fraction=profile.test_fraction,
                server=server.base_url,
                admin_token=ADMIN,
                enrollment_secret=SECRET,
                local_epochs=profile.local_epochs,
                batch_size=profile.batch_size,
                lr=profile.lr,
                initial_model=str(args.pretrained),
                update_encoding=encoding,
                update_error_feedback=feedback,
                seed=seed,
                workers=args.workers,
                progress=False,
            ),
            log=lambda _msg: None,
        )
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        ) as http:
            sizes = [
                p["update_bytes"]
                for r in result.rounds
                for p in http.get(f"/v1/rounds/{r.round_id}/participants").json()
                if p["update_bytes"] is not None
            ]
        with AdminClient(server.base_url, ADMIN, timeout=120) as admin:
            final_weights = admin.download_model(result.rounds[-1].model_version)
    final = result.rounds[-1]
    generic = lfw(final_weights)
    return {
        "encoding": name,
        "seed": seed,
        "statuses": [r.status for r in result.rounds],
        "reports": [r.reports for r in result.rounds],
        "lfw_accuracy": generic.get("accuracy"),
        "lfw_tar@far=1e-2": generic.get("tar@far=1e-2"),
        "heldout_rank1_per_round": [r.heldout_accuracy for r in result.rounds],
        "heldout_rank1": final.heldout_accuracy,
        "bytes_per_upload": statistics.mean(sizes) if sizes else None,
        "uploads": len(sizes),
        "wall_s": round(time.perf_counter() - started, 1),
    }, final_weights


def lfw_evaluator(checkpoint: Path, lfw_dir: Path) -> tuple[Any, dict[str, float]]:
    """A function weights -> LFW folds 6-10 report (accuracy, tar@far=...), and the checkpoint's report."""
    import torch

    from facefl.embedders import TorchEmbedder
    from facefl.evaluation import VerificationSet, evaluate_verification
    from facefl.models import backbone_from_weights

    torch.set_num_threads(1)
    ckpt = load_checkpoint(checkpoint)
    vset = VerificationSet.from_dir(lfw_dir, ckpt.image_size)

    def evaluate(weights: dict[str, Any]) -> dict[str, float]:
        model = backbone_from_weights(ckpt.architecture, ckpt.embedding_dim, weights)
        report = evaluate_verification(TorchEmbedder(model.eval(), ckpt.architecture), vset)
        return {k: float(v) for k, v in report.items() if isinstance(v, int | float)}

    return evaluate, evaluate(ckpt.tensors)


def model_distance(
    weights: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    initial: dict[str, np.ndarray],
    min_ndim: int = 0,
) -> float:
    """||weights - reference|| / ||reference - initial|| over the float tensors of at least ``min_ndim``
    dimensions: how far an encoding moved the final model from float32's (same seed), relative to how far
    training moved float32's. ``min_ndim=2``: the tensors int8 quantizes (without the batch-norm running
    statistics and biases, sent as float32 and moved by training more than the weights)."""
    names = [k for k, v in reference.items() if np.issubdtype(v.dtype, np.floating) and v.ndim >= min_ndim]
    apart = sum(float(np.sum((weights[k].astype(np.float64) - reference[k]) ** 2)) for k in names)
    moved = sum(float(np.sum((reference[k].astype(np.float64) - initial[k]) ** 2)) for k in names)
    return float(np.sqrt(apart / moved)) if moved > 0 else float("nan")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per encoding: means and standard deviations over seeds, paired change against float32."""
    reference = {r["seed"]: r for r in runs if r["encoding"] == "float32"}
    ref_acc = [r["lfw_accuracy"] for r in reference.values()]
    ref_std = _mean_std(ref_acc)[1] if ref_acc else float("nan")
    ref_bytes = statistics.mean(r["bytes_per_upload"] for r in reference.values()) if reference else None
    rows = []
    for name in dict.fromkeys(r["encoding"] for r in runs):
        mine = [r for r in runs if r["encoding"] == name]
        acc_mean, acc_std = _mean_std([r["lfw_accuracy"] for r in mine])
        tar_mean, tar_std = _mean_std([r["lfw_tar@far=1e-2"] for r in mine])
        size = statistics.mean(r["bytes_per_upload"] for r in mine)
        changes = [
            r["lfw_accuracy"] - reference[r["seed"]]["lfw_accuracy"] for r in mine if r["seed"] in reference
        ]
        change_mean, change_std = _mean_std(changes) if changes else (float("nan"), float("nan"))
        spread = max(ref_std, change_std)
        rows.append(
            {
                "encoding": name,
                "seeds": [r["seed"] for r in mine],
                "bytes_per_upload": size,
                "bytes_vs_float32": size / ref_bytes if ref_bytes else None,
                "lfw_accuracy_mean": acc_mean,
                "lfw_accuracy_std": acc_std,
                "lfw_tar_mean": tar_mean,
                "lfw_tar_std": tar_std,
                "lfw_change_vs_float32_mean": change_mean,
                "lfw_change_vs_float32_std": change_std,
                "model_distance_vs_float32_mean": statistics.mean(
                    r.get("model_distance_vs_float32", float("nan")) for r in mine
                ),
                "weight_distance_vs_float32_mean": statistics.mean(
                    r.get("weight_distance_vs_float32", float("nan")) for r in mine
                ),
                # one seed has no spread to compare with: unknown (None)
                "within_spread": (
                    bool(abs(change_mean) <= spread) if name != "float32" and len(mine) > 1 else None
                ),
                "wall_s_mean": statistics.mean(r["wall_s"] for r in mine),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| encoding | bytes / upload | vs float32 | LFW acc (mean ± std) "
        "| change vs float32, points (paired) | LFW TAR@1e-2 | final model vs float32's (all / weights) "
        "| seeds | s / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["encoding"] == "float32":
            change = "reference"
        else:
            change = (
                f"{100 * r['lfw_change_vs_float32_mean']:+.2f} ± {100 * r['lfw_change_vs_float32_std']:.2f}"
                + SPREAD_NOTE[r["within_spread"]]
            )
        ratio = f"{100 * r['bytes_vs_float32']:.0f}%" if r["bytes_vs_float32"] else "-"
        lines.append(
            f"| {r['encoding']} | {r['bytes_per_upload']:,.0f} | {ratio} "
            f"| {r['lfw_accuracy_mean']:.4f} ± {r['lfw_accuracy_std']:.4f} | {change} "
            f"| {r['lfw_tar_mean']:.4f} ± {r['lfw_tar_std']:.4f} "
            f"| {100 * r['model_distance_vs_float32_mean']:.2f}% / "
            f"{100 * r['weight_distance_vs_float32_mean']:.2f}% | {len(r['seeds'])} "
            f"| {r['wall_s_mean']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pretrained", type=Path, required=True, help="a `facefl pretrain --model small` checkpoint"
    )
    p.add_argument("--lfw", type=Path, default=SHARED / "lfw", help="LFW-layout directory with pairs.txt")
    p.add_argument("--devices-data", type=Path, default=SHARED / "celeba", help="image folder of the devices")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    p.add_argument("--encodings", default=",".join(ENCODINGS[:5]), help=f"of {', '.join(ENCODINGS)}")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (3)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="device worker processes")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        p.error(f"--encodings: unknown {unknown}; known: {', '.join(ENCODINGS)}")
    if "float32" not in encodings:
        p.error("--encodings must include float32 (the reference)")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for name, path in (
        ("--lfw", args.lfw / "pairs.txt"),
        ("--devices-data", args.devices_data),
        ("--pretrained", args.pretrained),
    ):
        if not path.exists():
            p.error(f"{name}: {path} not found")
    started = time.perf_counter()
    lfw, initial = lfw_evaluator(args.pretrained, args.lfw)
    log(f"pretrained checkpoint: LFW acc {initial['accuracy']:.4f} ({time.perf_counter() - started:.0f} s)")
    runs: list[dict[str, Any]] = []
    reference: dict[int, dict[str, np.ndarray]] = {}  # seed -> float32's final weights
    initial_weights = load_checkpoint(args.pretrained).tensors
    meta = {
        "command": " ".join(["python benchmarks/compression_accuracy.py", *(argv or sys.argv[1:])]),
        "setting": "benchmarks/accuracy.py --profile cpu, FedAvg" + f", {args.rounds} rounds",
        "checkpoint": str(args.pretrained),
        "checkpoint_lfw": initial,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
    }
    # seed-major: every encoding of a seed before the next seed, so an interrupted run stays paired
    for seed in seeds:
        for name in encodings:
            load = os.getloadavg()[0]
            run, weights = run_one(name, seed, args, lfw)
            if name == "float32":
                reference[seed] = weights
            if seed in reference:
                run["model_distance_vs_float32"] = model_distance(weights, reference[seed], initial_weights)
                run["weight_distance_vs_float32"] = model_distance(
                    weights, reference[seed], initial_weights, min_ndim=2
                )
            run["load_before"] = round(load, 2)
            runs.append(run)
            log(
                f"{name} seed {seed}: LFW acc {run['lfw_accuracy']:.4f}, "
                f"{run['bytes_per_upload']:,.0f} B/upload, "
                f"{run['wall_s']:.0f} s (load {load:.1f})"
            )
            report = {
                "meta": meta | {"wall_s": round(time.perf_counter() - started, 1)},
                "runs": runs,
                "summary": summarize(runs),
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(summarize(runs)))
    print(f"wall time {time.perf_counter() - started:.0f} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
