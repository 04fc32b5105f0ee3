"""Privacy audit: how much of a device's face an honest-but-curious server recovers from what it receives.

    python benchmarks/privacy_audit.py [--data ../shared/data] [--dataset celeba] [--synthetic]
        [--targets 4] [--iterations 500] [--restarts 1] [--secagg 2,4] [--noise 0.1,1.0]
        [--checkpoint FILE] [--dlib FILE] [--out runs/privacy_audit] [--json PATH]

The attack is gradient inversion in the style of Geiping et al. (NeurIPS 2020), facefl.privacy.inversion.
The attacker's best case throughout: the ``small`` backbone at random initialisation (the weights it sent;
``--checkpoint`` attacks trained weights instead), and it knows each device's label and private CosFace
head (never uploaded in facefl).

What a device computes (per device, one image ``x`` of its owner, label 0): the ``small`` backbone in eval
mode (BatchNorm with the received running statistics: a train-mode BatchNorm cannot step on one image),
its CosFace head (scale 30, margin 0.4, facefl's defaults) with two rows, the owner's and one other
enrolled person's, each initialised as facefl does to that person's normalised embedding, and one plain SGD
step with the default lr 0.05. The server observes ``delta = -lr * grad_theta CE(head(f_theta(x)), 0)``
over every backbone parameter (momentum does nothing on a first step; weight decay is a known function
of the weights it sent, so the server can subtract it, and it is left out). Scenarios:

- ``plain``: one device's delta, as uploaded without secure aggregation;
- ``secagg-K``: the sum of K devices' deltas (other faces, other people), which is all that secure
  aggregation lets the server see; the attacker reconstructs the K images jointly, knowing every label
  and head, and is scored on device 1's;
- ``dp-z``: one delta clipped to norm C (the median plain delta norm of the run) with Gaussian noise of
  standard deviation z*C per coordinate added.

Metrics per scenario over the targets (mean +- std): the cosine between dlib's ResNet embeddings
(``facefl import-model dlib-resnet``) of the reconstruction and of the true 64x64 input, rank-1
identification of the reconstruction among the gallery of enrolled people (the targets' other photos and
distractor people, also at 64x64), pixel PSNR, and the final cosine matching loss. Reference rows: the
true input itself (the identification ceiling) and another person's face. PNG strips (true over
reconstructed) go to ``--out`` (runs/ is git-ignored: never commit them); the JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._privacy_faces import Judge, dlib_embedder, load_faces, psnr, write_strip  # noqa: E402
from facefl.algorithms.base import Hyperparams  # noqa: E402
from facefl.data import preprocessing_for  # noqa: E402
from facefl.models import build_backbone  # noqa: E402
from facefl.privacy.inversion import (  # noqa: E402
    InversionConfig,
    cosine_matching_loss,
    invert_update,
    sgd_step_update,
)

ARCH = "small"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "privacy_audit.json"


def update_norm(update: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(torch.stack([(u.double() ** 2).sum() for u in update]).sum()))


def clip_and_noise(
    update: Sequence[torch.Tensor], clip: float, multiplier: float, gen: torch.Generator
) -> list[torch.Tensor]:
    """``update`` scaled to global L2 norm at most ``clip``, plus N(0, (multiplier * clip)^2) per
    coordinate (the Gaussian mechanism of DP-FedAvg on one device's delta)."""
    if clip <= 0 or multiplier < 0:
        raise ValueError(f"need clip > 0 and multiplier >= 0, got {clip}, {multiplier}")
    norm = update_norm(update)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return [u * factor + multiplier * clip * torch.randn(u.shape, generator=gen) for u in update]


class Devices:
    """The devices' local math (module doc) on one received model: heads and the update of a batch of
    devices (one image each); the sum over the batch is what secure aggregation reveals."""

    def __init__(self, model: torch.nn.Module, hp: Hyperparams) -> None:
        self.model = model.eval()
        self.hp = hp
        self.params = list(model.parameters())

    @torch.no_grad()
    def head(self, own: np.ndarray, companion: np.ndarray) -> torch.Tensor:
        """(2, d) rows: the owner's and the companion's normalised embeddings (facefl's head init)."""
        return F.normalize(self.model(to_tensor(np.stack([own, companion]))), dim=1)

    def update_fn(self, heads: torch.Tensor) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """images (n, 3, S, S) -> the summed delta of n devices with ``heads`` (n, 2, d), labels 0."""
        labels = torch.zeros(len(heads), dtype=torch.long)
        onehot = F.one_hot(labels, 2).float()

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            cos = torch.einsum("nd,ncd->nc", F.normalize(self.model(images), dim=1), heads)
            logits = self.hp.scale * (cos - self.hp.margin * onehot)
            return F.cross_entropy(logits, labels, reduction="sum")  # each device's own mean over 1 image

        return sgd_step_update(self.params, loss_of, self.hp.lr)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(preprocessing_for(ARCH).batch(pixels))


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised (n, 3, S, S) -> uint8 (n, S, S, 3) (facefl's (x / 255 - 0.5) / 0.5 undone)."""
    return ((x.detach().clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def received_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model the devices received: a random init (the attacker's best case) or ``--checkpoint``."""
    if not args.checkpoint:
        return build_backbone(ARCH, seed=args.model_seed)
    from facefl.checkpoint import build_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.architecture != ARCH:
        raise SystemExit(f"{args.checkpoint} is a {ckpt.architecture} checkpoint; the audit attacks {ARCH}")
    return build_from_checkpoint(ckpt)


def model_label(args: argparse.Namespace) -> str:
    return (
        f"weights of {Path(args.checkpoint).name}"
        if args.checkpoint
        else f"random init (seed {args.model_seed})"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="root of the aligned faces")
    p.add_argument("--dataset", default="celeba", help="folder under --data (<identity>/<file>.jpg)")
    p.add_argument("--synthetic", action="store_true", help="facefl's synthetic faces instead of --data")
    p.add_argument("--targets", type=int, default=4, help="target people (one face each)")
    p.add_argument("--distractors", type=int, default=40, help="extra people in the gallery")
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--restarts", type=int, default=1, help="random restarts; the lowest matching loss wins")
    p.add_argument("--tv", type=float, default=0.2, help="total-variation weight")
    p.add_argument("--attack-lr", type=float, default=0.1)
    p.add_argument("--init-std", type=float, default=0.1, help="std of the restarts' Gaussian start")
    p.add_argument("--unsigned", action="store_true", help="Adam on the raw gradient, not its sign")
    p.add_argument("--secagg", default="2,4", help="numbers of devices summed (K >= 2), comma-separated")
    p.add_argument("--noise", default="0.1,1.0", help="DP noise multipliers z, comma-separated")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the random-init small model")
    p.add_argument("--checkpoint", help="a trained small checkpoint to attack instead of a random init")
    p.add_argument("--seed", type=int, default=0, help="choice of people, attack and DP noise")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dlib", help="dlib-resnet checkpoint (default: imported into --out)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "privacy_audit", help="PNG strips")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    args.secagg = [int(k) for k in args.secagg.split(",") if k.strip()]
    args.noise = [float(z) for z in args.noise.split(",") if z.strip()]
    if any(k < 2 for k in args.secagg) or any(z < 0 for z in args.noise) or args.targets < 1:
        p.error("--secagg needs K >= 2, --noise z >= 0, --targets >= 1")
    return args


@dataclass(frozen=True)
class Scenario:
    name: str
    observed: str  # what the server sees, in words
    devices: int = 1  # devices summed (secure aggregation); 1: a plain upload
    noise: float | None = None  # DP noise multiplier z (clip + noise on the one delta)


def scenarios_of(args: argparse.Namespace, clip: float) -> list[Scenario]:
    out = [Scenario("plain", "one device's delta")]
    out += [Scenario(f"secagg-{k}", f"sum of {k} devices' deltas", devices=k) for k in args.secagg]
    out += [
        Scenario(f"dp-{z:g}", f"one delta clipped to C={clip:.3g}, N(0, ({z:g} C)^2) noise added", noise=z)
        for z in args.noise
    ]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = preprocessing_for(ARCH).image_size
    faces = load_faces(args, ARCH)
    hp = Hyperparams()
    devices = Devices(received_model(args), hp)
    judge = Judge(dlib_embedder(args, args.out), faces.gallery)
    config = InversionConfig(
        args.iterations,
        args.restarts,
        args.attack_lr,
        args.tv,
        signed_gradients=not args.unsigned,
        init_std=args.init_std,
        seed=args.seed,
    )

    def observed_of(
        images: list[np.ndarray], companions: list[np.ndarray]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The summed delta of one device per image, and the devices' heads."""
        heads = torch.stack([devices.head(x, c) for x, c in zip(images, companions, strict=True)])
        return [u.detach() for u in devices.update_fn(heads)(to_tensor(np.stack(images)))], heads

    plain = [
        observed_of([t.pixels], [c.pixels]) for t, c in zip(faces.targets, faces.companions, strict=True)
    ]
    norms = [update_norm(obs) for obs, _ in plain]
    clip = statistics.median(norms)  # the typical update norm: clipping alone changes little
    scenarios = scenarios_of(args, clip)
    cost = sum(s.devices for s in scenarios)  # the attack's step is about linear in the images it fits
    bar = tqdm(
        total=cost * len(faces.targets) * args.iterations * args.restarts, unit="img-it", file=sys.stderr
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows: list[dict[str, Any]] = []
    strips: dict[str, list[np.ndarray]] = {}
    for sc in scenarios:
        scores: dict[str, list[float]] = {"cos": [], "rank1": [], "psnr": [], "loss": [], "signal": []}
        recs: list[np.ndarray] = []
        wall, cpu = time.perf_counter(), time.process_time()
        for t, target in enumerate(faces.targets):
            images, comps = [target.pixels], [faces.companions[t].pixels]
            for b, other in enumerate(faces.bystanders[t][: sc.devices - 1]):
                images.append(other.pixels)
                comps.append(faces.companions[(t + b + 1) % len(faces.targets)].pixels)
            observed, heads = plain[t] if sc.devices == 1 else observed_of(images, comps)
            if sc.noise is not None:
                observed = clip_and_noise(observed, clip, sc.noise, gen)
            # how much of device 1's own delta is left in what the server sees (1: all of it)
            scores["signal"].append(1.0 - float(cosine_matching_loss(observed, plain[t][0])))
            result = invert_update(
                devices.update_fn(heads),
                observed,
                (len(images), 3, size, size),
                config,
                partial(bar.update, len(images)),
            )
            rec = to_pixels(result.images)[0]
            cos, hit = judge.score(rec, target.pixels, target.identity)
            scores["cos"].append(cos)
            scores["rank1"].append(float(hit))
            scores["psnr"].append(psnr(rec, target.pixels))
            scores["loss"].append(result.matching_loss)
            recs.append(rec)
        strips[sc.name] = recs
        rows.append(
            {
                "scenario": sc.name,
                "observed": sc.observed,
                "embedding_cosine": mean_std(scores["cos"]),
                "rank1": mean_std(scores["rank1"]),
                "psnr_db": mean_std(scores["psnr"]),
                "matching_loss": mean_std(scores["loss"]),
                "cosine_observed_to_device1_delta": mean_std(scores["signal"]),
                "per_target": {k: [round(v, 4) for v in vs] for k, vs in scores.items()},
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
            }
        )
    bar.close()
    for label, probes in (
        ("reference: true input", [t.pixels for t in faces.targets]),
        ("reference: another person", [c.pixels for c in faces.companions]),
    ):
        pairs = list(zip(probes, faces.targets, strict=True))
        scored = [judge.score(p, t.pixels, t.identity) for p, t in pairs]
        rows.append(
            {
                "scenario": label,
                "embedding_cosine": mean_std([c for c, _ in scored]),
                "rank1": mean_std([float(h) for _, h in scored]),
                "psnr_db": mean_std([psnr(p, t.pixels) for p, t in pairs]),
            }
        )
    truth = [t.pixels for t in faces.targets]
    for name, recs in strips.items():
        write_strip(args.out / f"{name}.png", [truth, recs])
    write_strip(args.out / "all.png", [truth, *strips.values()])
    return {
        "command": " ".join(["python", "benchmarks/privacy_audit.py", *sys.argv[1:]]),
        "data": "synthetic" if args.synthetic else args.dataset,
        "model": f"{ARCH}, {model_label(args)}, eval-mode BatchNorm",
        "device_step": {"lr": hp.lr, "scale": hp.scale, "margin": hp.margin, "images_per_device": 1},
        "attack": {
            "iterations": args.iterations,
            "restarts": args.restarts,
            "lr": args.attack_lr,
            "tv_weight": args.tv,
            "init_std": args.init_std,
            "signed_gradients": not args.unsigned,
            "knows": "every summed device's label and CosFace head",
        },
        "targets": [t.identity for t in faces.targets],
        "gallery_people": len(faces.gallery),
        "chance_rank1": 1 / len(faces.gallery),
        "clip_norm": clip,
        "plain_update_norms": norms,
        "rows": rows,
        "strips": args.out.name,
    }


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\n{len(results['targets'])} targets, gallery of {results['gallery_people']} people "
        f"(chance rank-1 {results['chance_rank1']:.3f}); {results['model']}"
    )
    print("| scenario | dlib cosine to truth | rank-1 | PSNR dB | matching loss | observed vs own delta |")
    print("|---|---|---|---|---|---|")
    for row in results["rows"]:
        cells = [f"{row[k]['mean']:.3f} +- {row[k]['std']:.3f}" for k in ("embedding_cosine", "rank1")]
        cells.append(f"{row['psnr_db']['mean']:.1f} +- {row['psnr_db']['std']:.1f}")
        for key in ("matching_loss", "cosine_observed_to_device1_delta"):
            m = row.get(key)
            cells.append(f"{m['mean']:.3f} +- {m['std']:.3f}" if m else "-")
        print(f"| {row['scenario']} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json} and the strips in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
