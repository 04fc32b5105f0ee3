"""Local training speed of one device round, per algorithm, on every available torch device.

    python benchmarks/train_step.py                 # CPU, and CUDA when present
    python benchmarks/train_step.py --images 400 --json benchmarks/results/train_step.json

Runs the SDK's Trainer (the code path devices run) on generated faces: FedAvg, FedFR (with hard
negatives from a generated public set and, in the second round, the contrastive term) and FedFace.
Prints a markdown table (seconds per round, images per second) and checks on every device that the
update is finite, with the update norms side by side (CPU and CUDA should be close, not bitwise equal).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from device_sdk import LocalDataset, RoundInputs, Trainer  # noqa: E402
from facefl import codec  # noqa: E402
from facefl.algorithms.fedfr import PUBLIC_HEAD_KEY  # noqa: E402
from facefl.data.public import PublicSet  # noqa: E402
from facefl.models import build_backbone, state_to_numpy  # noqa: E402
from facefl.vectors import l2_normalize  # noqa: E402


@dataclass(frozen=True)
class Job:
    architecture: str
    embedding_dim: int | None
    algorithm: str
    hyperparams: dict[str, Any] = field(default_factory=dict)


def run(model: str, images: int, ids: int, epochs: int, devices: list[str]) -> list[dict[str, Any]]:
    base = state_to_numpy(build_backbone(model, seed=0))
    size = 64 if model == "small" else 112
    per_id = max(2, images // ids)
    data = LocalDataset.synthetic(list(range(ids)), per_id, size, seed=0)
    one = LocalDataset.synthetic([0], per_id, size, seed=0)
    pub_images = np.concatenate(
        [LocalDataset.synthetic([1000 + i], 4, size, seed=1).images for i in range(64)]
    )
    public = PublicSet(pub_images, np.repeat(np.arange(64), 4), [f"p{i}" for i in range(64)])
    rows: list[dict[str, Any]] = []
    for dev in devices:
        trainer = Trainer(device=dev)
        dim = build_backbone(model).embedding_dim
        bank = trainer.embed(base, pub_images, architecture=model)
        head = l2_normalize(bank.reshape(64, 4, -1).mean(1))
        fedfr_base = {**base, PUBLIC_HEAD_KEY: head}
        hp = {"local_epochs": epochs, "batch_size": 32, "lr": 0.01, "max_hard_negatives": len(data)}
        cases = [
            ("fedavg", base, data, None),
            ("fedfr", fedfr_base, data, RoundInputs(public=public, bank_embeddings=bank)),
            ("fedface", base, one, None),
        ]
        for algorithm, weights, dataset, inputs in cases:
            with tempfile.TemporaryDirectory() as state:
                job = Job(model, dim, algorithm, {**hp, "hard_negative_threshold": -1.0})
                trainer.train(job, weights, dataset, state, seed=0, inputs=inputs)  # warm-up + first round
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                result = trainer.train(job, weights, dataset, state, seed=1, inputs=inputs)
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            finite = all(np.isfinite(v).all() for v in result.delta.values())
            trained = len(dataset) + int(result.metrics.get("hard_negatives", 0))
            rows.append(
                {
                    "device": dev,
                    "model": model,
                    "algorithm": algorithm,
                    "images": trained,
                    "epochs": epochs,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(trained * epochs / seconds, 1),
                    "delta_norm": round(codec.global_norm(result.delta), 4),
                    "finite": finite,
                    "metrics": {k: round(float(v), 4) for k, v in result.metrics.items()},
                }
            )
            print(f"{dev} {model} {algorithm}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,mobilefacenet")
    p.add_argument("--images", type=int, default=160, help="local images per device (160)")
    p.add_argument("--ids", type=int, default=8, help="local identities (8)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [
        r for m in args.models.split(",") for r in run(m.strip(), args.images, args.ids, args.epochs, devices)
    ]
    print("| device | model | algorithm | images x epochs | s / round | images/s | update norm | finite |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['device']} | {r['model']} | {r['algorithm']} | {r['images']} x {r['epochs']} "
            f"| {r['seconds']:.2f} | {r['images_per_s']:.0f} | {r['delta_norm']:.3f} | {r['finite']} |"
        )
    info = {
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=2) + "\n")
    ok = all(r["finite"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
