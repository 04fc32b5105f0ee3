"""The accuracy table: pretrained only, local-only, FedAvg, FedProx, FedFace, FedFR (+ ablations).

    python benchmarks/accuracy.py --profile cpu      # small model, 64x64, 2 CPU cores
    python benchmarks/accuracy.py --profile paper    # MobileFaceNet, 112x112 (for a GPU)
    python benchmarks/accuracy.py --profile smoke --lfw DIR --devices-data DIR   # tiny, minutes

Protocol (DESIGN section 6): the model is pretrained on the LFW public split (identities of pair folds
1-5 and of no fold); generic = LFW pair folds 6-10 (never trained on); devices = CelebA identities, each
identity's images split into the device's training and test images (facefl.data.protocol, the same
plan the simulator uses). Every row starts from the same pretrained checkpoint:
- pretrained only: the checkpoint as is, on every device;
- local-only: each device fine-tunes the checkpoint alone on its own images, with the same total local
  compute as it gets in the federated run (rounds x local epochs), and is tested with its own model;
- FedAvg, FedProx, FedFace, FedFR, FedFR without DFC, FedFR without the contrastive term: each a
  `facefl simulate` run against a real uvicorn server (SQLite) that evaluates every new model version
  on LFW folds 6-10 itself (generic columns: the final global model). Personalized columns: FedFR's
  devices use their own personalized model (their backbone after local training + the DFC converter,
  read from each simulated device's state directory); the other methods use the final global model on
  every device. FedFace trains one identity per device: the same identities, each on its own device,
  with the same train/test images (facefl.data.protocol.device_split is keyed on identity names).
Hyper-parameters come from the profile and the papers; none is chosen by looking at folds 6-10.
Writes a markdown table to stdout, JSON and per-round curves (PNG) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Profile:
    model: str
    pretrain_epochs: int
    devices: int
    ids_per_device: int
    heldout_ids: int
    rounds: int
    local_epochs: int
    lr: float
    batch_size: int
    test_fraction: float
    images_per_id: int | None = None
    # FedFR: at most this many hard negatives per device and round (the hardest first): a compute bound
    max_hard_negatives: int = 128


@dataclass(frozen=True)
class Method:
    """A federated row: the task's algorithm and extra hyper-parameters."""

    name: str
    algorithm: str
    hyperparams: tuple[tuple[str, float], ...] = ()
    mu: float | None = None


METHODS = (
    Method("FedAvg", "fedavg"),
    Method("FedProx", "fedprox", mu=0.01),
    Method("FedFace", "fedface"),
    Method("FedFR", "fedfr"),
    Method("FedFR w/o DFC", "fedfr", (("dfc_weight", 0.0),)),
    Method("FedFR w/o contrastive", "fedfr", (("contrastive_weight", 0.0),)),
)


PROFILES = {
    "smoke": Profile("small", 2, 4, 3, 2, 2, 1, 0.01, 16, 0.34),
    "cpu": Profile("small", 0, 30, 8, 50, 5, 1, 0.01, 32, 0.3),  # 0 epochs: the pretrain CLI's default
    "paper": Profile("mobilefacenet", 0, 30, 8, 50, 10, 2, 0.01, 32, 0.3),
}


@dataclass
class Row:
    name: str
    generic: dict[str, float]
    personalized: dict[str, float]
    seconds: float


def log(msg: str) -> None:
    print(f"[accuracy] {msg}", file=sys.stderr, flush=True)


def pretrain(profile: Profile, lfw: Path, out: Path) -> Path:
    ckpt = out / f"pretrained-{profile.model}.safetensors"
    cmd = [sys.executable, "-m", "facefl", "pretrain", "--data", str(lfw), "--model", profile.model,
           "--out", str(ckpt)]  # fmt: skip
    if profile.pretrain_epochs:
        cmd += ["--epochs", str(profile.pretrain_epochs)]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, cwd=REPO)
    return ckpt


def evaluate_rows(
    profile: Profile, ckpt: Path, lfw: Path, celeba: Path, out: Path, methods: tuple[Method, ...] = METHODS
) -> dict[str, Any]:
    import torch

    from device_sdk import LocalDataset, Trainer
    from facefl import codec
    from facefl.checkpoint import load_checkpoint
    from facefl.embedders import TorchEmbedder
    from facefl.evaluation import VerificationSet, evaluate_personalized, evaluate_verification, load_devices
    from facefl.models import backbone_from_weights

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    checkpoint = load_checkpoint(ckpt)
    image_size = checkpoint.image_size
    vset = VerificationSet.from_dir(lfw, image_size)
    devices = load_devices(
        celeba,
        num_devices=profile.devices,
        ids_per_device=profile.ids_per_device,
        heldout_ids=profile.heldout_ids,
        test_fraction=profile.test_fraction,
        seed=0,
        image_size=image_size,
        max_images_per_identity=profile.images_per_id,
    )

    def embedder_for(weights: dict[str, np.ndarray]) -> TorchEmbedder:
        model = backbone_from_weights(checkpoint.architecture, checkpoint.embedding_dim, weights)
        return TorchEmbedder(model.eval(), checkpoint.architecture)

    rows: list[Row] = []
    t0 = time.perf_counter()
    base = embedder_for(checkpoint.tensors)
    generic_base, personal_base = evaluate_verification(base, vset), evaluate_personalized(base, devices)
    rows.append(Row("pretrained only", generic_base, personal_base, time.perf_counter() - t0))
    log(f"pretrained only: {rows[-1].generic['accuracy']:.4f}")

    # local-only: the same local compute as the federated run gives a device, but alone
    t0 = time.perf_counter()
    trainer = Trainer(num_threads=min(2, os.cpu_count() or 1))
    spec = _Assignment(checkpoint.architecture, checkpoint.embedding_dim, profile)
    local = []
    for d in devices:
        labels = d.train_labels - d.train_labels.min()
        dataset = LocalDataset.from_arrays(d.train_images, labels)
        result = trainer.train(spec, checkpoint.tensors, dataset, state_dir=None, seed=d.device)
        local.append(embedder_for(codec.apply_delta(checkpoint.tensors, result.delta)))
    generic = [evaluate_verification(e, vset) for e in local]
    rows.append(
        Row(
            "local-only",
            {k: float(np.mean([g[k] for g in generic])) for k in generic[0]},
            evaluate_personalized(local, devices),
            time.perf_counter() - t0,
        )
    )
    log(f"local-only: {rows[-1].generic['accuracy']:.4f}")

    curves: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        t0 = time.perf_counter()
        final, method_curves = run_federated(method, profile, ckpt, lfw, celeba, out, devices, embedder_for)
        method_curves[0]["personalized"] = _flat(personal_base)  # round 0: the pretrained checkpoint
        rows.append(Row(method.name, final[0], final[1], time.perf_counter() - t0))
        log(f"{method.name}: {rows[-1].generic.get('accuracy', float('nan')):.4f} ({rows[-1].seconds:.0f} s)")
        curves[method.name] = method_curves
        if method.name == "FedFR":  # what its global model alone gives the devices (no personalization)
            global_only = method_curves[-1]["personalized_global"]
            rows.append(Row("FedFR, global model only", final[0], global_only, 0.0))
    return {"rows": rows, "curves": curves}


@dataclass(frozen=True)
class _Assignment:
    """What the device Trainer needs (device_sdk.trainer.AssignmentLike) for local-only training."""

    architecture: str
    embedding_dim: int | None
    profile: Profile
    algorithm: str = "fedavg"

    @property
    def hyperparams(self) -> dict[str, Any]:
        p = self.profile
        return {"local_epochs": p.rounds * p.local_epochs, "batch_size": p.batch_size, "lr": p.lr}


def run_federated(
    method: Method,
    profile: Profile,
    ckpt: Path,
    lfw: Path,
    celeba: Path,
    out: Path,
    devices: Any,
    embedder_for: Any,
) -> tuple[tuple[dict[str, float], dict[str, float]], list[dict[str, Any]]]:
    import httpx

    from device_sdk import load_personalized_model
    from facefl import codec
    from facefl.embedders import TorchEmbedder
    from facefl.evaluation import evaluate_personalized
    from simulator import SimulationConfig, simulate
    from simulator.server import LocalServer

    admin = "bench-admin-token"
    fedface = method.algorithm == "fedface"
    fedfr = method.algorithm == "fedfr"
    slug = method.name.lower().replace(" ", "-").replace("/", "")
    hyperparams = dict(method.hyperparams)
    if fedfr:
        hyperparams.setdefault("max_hard_negatives", profile.max_hard_negatives)
    env = {"FACEFL_EVAL_SETS": json.dumps({"lfw": str(lfw.resolve())})}
    if fedfr:
        env["FACEFL_PUBLIC_SETS"] = json.dumps({"lfw-public": str(lfw.resolve())})
    with (
        tempfile.TemporaryDirectory(prefix="facefl-accuracy-") as tmp,
        LocalServer(
            Path(tmp) / "server",
            admin_token=admin,
            enrollment_secret="bench-enrollment-secret",
            extra_env=env,
        ) as server,
    ):
        result = simulate(
            SimulationConfig(
                # FedFace: the same identities, one per device
                devices=profile.devices * (profile.ids_per_device if fedface else 1),
                rounds=profile.rounds,
                model=profile.model,
                data=str(celeba),
                ids_per_device=1 if fedface else profile.ids_per_device,
                # a person with a single photo cannot train alone (FedFace); such devices sit out
                skip_small_devices=fedface,
                images_per_id=profile.images_per_id,
                heldout_ids=profile.heldout_ids,
                test_fraction=profile.test_fraction,
                server=server.base_url,
                admin_token=admin,
                enrollment_secret="bench-enrollment-secret",
                local_epochs=profile.local_epochs,
                batch_size=profile.batch_size,
                lr=profile.lr,
                algorithm=method.algorithm,
                mu=method.mu,
                public_set="lfw-public" if fedfr else None,
                extra_hyperparams=hyperparams,
                eval_set="lfw",
                initial_model=str(ckpt),
                json_path=str(out / f"{slug}-simulate.json"),
                work_dir=tmp,  # kept until the end of this block: FedFR's personal models live there
                progress=False,
            )
        )
        print(result.table(), file=sys.stderr)
        run_dirs = sorted(Path(tmp).glob("run-*"))
        curves = []
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {admin}"}, timeout=120
        ) as c:
            for r in result.rounds:
                weights = codec.decode(c.get(f"/v1/models/{r.model_version}").content)
                personal = evaluate_personalized(embedder_for(weights), devices)
                curves.append(
                    {
                        "round": r.round,
                        "status": r.status,
                        "generic": r.generic,
                        "personalized": _flat(personal),
                    }
                )
        if fedfr and run_dirs:
            # each device's own model after its last round (the simulator's device i is plan device i)
            per_device = [
                TorchEmbedder(
                    load_personalized_model(run_dirs[-1] / "devices" / str(d.device) / "state"), profile.model
                )
                for d in devices
            ]
            curves[-1]["personalized_global"] = curves[-1]["personalized"]  # the global model, for contrast
            curves[-1]["personalized"] = _flat(evaluate_personalized(per_device, devices))
            curves[-1]["personalized_model"] = "device backbone + DFC converter"
    final = curves[-1]
    return (final["generic"] or {}, final["personalized"]), [
        {"round": 0, "generic": result.initial_generic, "personalized": None},
        *curves,
    ]


def _flat(report: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if k != "per_device"}


COLUMNS = [
    ("generic", "accuracy", "LFW acc"),
    ("generic", "tar@far=1e-2", "LFW TAR@1e-2"),
    ("personalized", "tar@far=1e-2", "device TAR@1e-2"),
    ("personalized", "dir@far=1e-2", "device DIR@1e-2"),
]


def table(rows: list[Row]) -> str:
    head = "| method | " + " | ".join(c[2] for c in COLUMNS) + " | seconds |"
    lines = [head, "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = [f"{getattr(r, sec).get(key, float('nan')):.4f}" for sec, key, _ in COLUMNS]
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.seconds:.0f} |")
    return "\n".join(lines)


def plot(rows: list[Row], curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    specs = [
        ("generic", "accuracy", "LFW folds 6-10 accuracy (global model)"),
        ("personalized", "tar@far=1e-2", "device TAR@FAR=1e-2 (star: personalized)"),
        ("personalized", "dir@far=1e-2", "device DIR@FAR=1e-2 (star: personalized)"),
    ]
    for ax, (sec, key, title) in zip(axes, specs, strict=True):
        for name, method_curves in curves.items():
            # lines: the global model every round; FedFR's personalized models: one star at the end
            field = "personalized_global" if sec == "personalized" else sec
            pts = [
                (c["round"], (c.get(field) or c[sec])[key])
                for c in method_curves
                if c.get(sec) and key in c[sec]
            ]
            if pts:
                (line,) = ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name)
                last = method_curves[-1]
                if sec == "personalized" and "personalized_global" in last:
                    ax.plot(last["round"], last[sec][key], marker="*", markersize=11, color=line.get_color())
        for r, style in zip(rows[:2], ("--", ":"), strict=True):
            ax.axhline(getattr(r, sec)[key], linestyle=style, color="grey", label=r.name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--lfw", type=Path, default=SHARED / "lfw", help="LFW-layout directory with pairs.txt")
    p.add_argument("--devices-data", type=Path, default=SHARED / "celeba", help="image folder of the devices")
    p.add_argument("--pretrained", type=Path, help="use this checkpoint instead of pretraining")
    p.add_argument("--out", type=Path, help="results directory (default benchmarks/results/accuracy-PROFILE)")
    p.add_argument("--rounds", type=int, help="override the profile's federated rounds")
    p.add_argument(
        "--methods",
        default=",".join(m.name for m in METHODS),
        help="comma-separated federated rows to run (default: all): " + ", ".join(m.name for m in METHODS),
    )
    args = p.parse_args(argv)
    by_name = {m.name.lower(): m for m in METHODS}
    wanted = [name.strip().lower() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {[m.name for m in METHODS]}")
    methods = tuple(by_name[name] for name in wanted)
    profile = PROFILES[args.profile]
    if args.rounds:
        profile = replace(profile, rounds=args.rounds)
    for name, path in (("--lfw", args.lfw / "pairs.txt"), ("--devices-data", args.devices_data)):
        if not path.exists():
            p.error(f"{name}: {path} not found")
    out = args.out or REPO / "benchmarks" / "results" / f"accuracy-{args.profile}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ckpt = args.pretrained or pretrain(profile, args.lfw, out)
    result = evaluate_rows(profile, ckpt, args.lfw, args.devices_data, out, methods)
    rows: list[Row] = result["rows"]
    print(table(rows))
    plot(rows, result["curves"], out / "curves.png")
    report = {
        "profile": args.profile,
        "settings": asdict(profile),
        "checkpoint": str(ckpt),
        "rows": [asdict(r) | {"personalized": _flat(r.personalized)} for r in rows],
        "rounds": result["curves"],
        "wall_s": time.perf_counter() - started,
    }
    (out / "accuracy.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"wrote {out / 'accuracy.json'} and {out / 'curves.png'} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
