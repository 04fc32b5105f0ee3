"""Choose the strong profile's learning rate on LFW validation folds (never on the test folds 6-10).

    python benchmarks/strong_lr.py --lrs 0.01,0.001,0.0001 --devices 2

For each lr, the first ``--devices`` devices of the ``strong`` profile's plan fine-tune the imported
dlib-resnet alone, exactly as its local-only row does (trainable groups, rounds x local epochs, batch
size), and each device's model is evaluated on LFW pair folds ``--folds`` (default 4 and 5: public-split
folds, whose identities the test folds never share). The criterion is the release gate's: a learning rate
whose models lose more than the gate's ``max_drop`` of validation accuracy against the imported model
would have every federated version held back. Prints a markdown table; JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="the imported dlib-resnet checkpoint")
    p.add_argument("--profile", default="strong")
    p.add_argument("--lrs", default="0.01,0.001,0.0001")
    p.add_argument("--devices", type=int, default=2, help="devices of the plan that train (the first ones)")
    p.add_argument("--folds", default="4,5", help="LFW validation folds (not 6-10)")
    p.add_argument("--lfw", type=Path, default=SHARED / "lfw")
    p.add_argument("--devices-data", type=Path, default=SHARED / "celeba")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "strong_lr.json")
    args = p.parse_args(argv)

    import torch

    from benchmarks.accuracy import PROFILES, _Assignment
    from device_sdk import LocalDataset, Trainer
    from facefl import codec
    from facefl.checkpoint import load_checkpoint
    from facefl.embedders import TorchEmbedder
    from facefl.evaluation import VerificationSet, evaluate_verification, load_devices
    from facefl.models import backbone_from_weights

    folds = [int(f) for f in args.folds.split(",")]
    if set(folds) & set(range(6, 11)):
        p.error("--folds must avoid the test folds 6-10")
    profile = PROFILES[args.profile]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ckpt = load_checkpoint(args.checkpoint)
    vset = VerificationSet.from_dir(args.lfw, ckpt.image_size, test_folds=folds)
    devices = load_devices(
        args.devices_data,
        num_devices=profile.devices,
        ids_per_device=profile.ids_per_device,
        heldout_ids=profile.heldout_ids,
        test_fraction=profile.test_fraction,
        seed=0,
        image_size=ckpt.image_size,
        max_images_per_identity=profile.images_per_id,
    )[: args.devices]

    def accuracy(weights: dict) -> float:
        model = backbone_from_weights(ckpt.architecture, ckpt.embedding_dim, weights)
        return float(evaluate_verification(TorchEmbedder(model.eval(), ckpt.architecture), vset)["accuracy"])

    t0 = time.perf_counter()
    base = accuracy(ckpt.tensors)
    print(
        f"[strong_lr] imported model on {vset.name}: {base:.4f} ({time.perf_counter() - t0:.0f} s)",
        file=sys.stderr,
    )
    gate_drop = float((profile.gate or "accuracy:0.003").split(":")[1])
    results = []
    trainer = Trainer(num_threads=min(2, os.cpu_count() or 1))
    for lr in [float(x) for x in args.lrs.split(",")]:
        spec = _Assignment(ckpt.architecture, ckpt.embedding_dim, replace(profile, lr=lr))
        accs = []
        for d in devices:
            t0 = time.perf_counter()
            labels = d.train_labels - d.train_labels.min()
            result = trainer.train(
                spec,
                ckpt.tensors,
                LocalDataset.from_arrays(d.train_images, labels),
                state_dir=None,
                seed=d.device,
            )
            accs.append(accuracy(codec.apply_delta(ckpt.tensors, result.delta)))
            print(
                f"[strong_lr] lr {lr:g} device {d.device}: {accs[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
        results.append(
            {"lr": lr, "accuracy": accs, "mean": statistics.mean(accs), "drop": base - statistics.mean(accs)}
        )
    print(
        f"{vset.name}, imported model {base:.4f}; {len(devices)} devices alone, "
        f"{profile.rounds * profile.local_epochs} epochs on {list(profile.trainable or ['all'])}\n"
    )
    print("| lr | validation accuracy (mean over devices) | drop | within the gate's max_drop |")
    print("|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['lr']:g} | {r['mean']:.4f} | {r['drop']:+.4f} | "
            f"{'yes' if r['drop'] <= gate_drop else 'no'} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"set": vset.name, "base": base, "gate_max_drop": gate_drop, "results": results}, indent=2)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
