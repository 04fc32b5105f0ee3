"""How should devices fine-tune dlib-resnet? A cheap study of federated fine-tuning on validation identities.

    python benchmarks/finetune_study.py --checkpoint dlib.safetensors            # validation identities
    python benchmarks/finetune_study.py --checkpoint dlib.safetensors --split test --configs adam-1e-5

The strong accuracy profile trains only dlib-resnet's ``level0`` and ``fc`` groups. Everything below them
is frozen, so its output (``level1``: 256 x 4 x 4 per face) can be computed once and cached (``--cache``,
about 150 MB for CelebA with mirror images and LFW folds 4-10). Training the top on cached features costs
seconds instead of the real run's forty minutes, so many settings and seeds fit in one study, and the
mean +- std over seeds shows whether a difference is larger than the spread of device plans.

What is simulated, per seed: FedAvg over 6 devices x 8 CelebA identities (the strong profile's shape), each
device training the top with a CosFace head imprinted from its class means (kept across rounds, as the
SDK keeps it), batch 32, half the images mirrored, weighted mean of the devices' models; ``local`` trains
each device alone for rounds x epochs. ``public``: the device's logits also hold the public identities'
prototypes as negatives (FedFR's union logits; the 50 held-out CelebA identities of the plan stand in for
the public set here). Metrics as in ``benchmarks/accuracy.py``: device TAR@FAR=1e-3 and DIR@FAR=1e-3 with
the global model on every device (local: each device's own), LFW accuracy and TAR@FAR=1e-3.

``loss="metric"`` settings train with dlib's own loss (:func:`facefl.losses.pair_margin_loss`, on the
unnormalized output) instead of the CosFace head; their variants aimed at device DIR count every
violating negative pair (``allneg``), widen dlib's margin (``margin0.1``), train only ``fc`` (``fc``), or
let each device fine-tune the global model one more local epoch and test it with its own
(``personalize``; LFW then uses device 0's model), or use the public strangers only as negatives of the
device's images (``strangers``; ``hardstrangers``: only the 64 closest to the device's people).
``--devices N --ids-per-device K`` sizes the federation
(default the strong profile's 6 x 8).

``--split val`` (the default) draws each seed's devices from CelebA identities that the strong profile's
plan of that seed does not use, and evaluates LFW on folds 4-5: choose settings here. ``--split test``
uses the plan's own devices and LFW folds 6-10: run it only for a setting chosen on ``val``. Every plan
leaves out ``--exclude`` (by default the audited data defects, ``accuracy.EXCLUDED_IDENTITIES``).

Device columns come twice: ``device_*`` with the other devices' test images as the only impostors (the
first studies' protocol), ``*_strangers`` with the people on no device as impostors too (val: the
unused identities no device drew; test: the plan's held-out ones, as ``benchmarks/accuracy.py`` does).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from accuracy import EXCLUDED_IDENTITIES  # noqa: E402
from finetune_settings import SETTINGS, Setting  # noqa: E402

DEVICES, IDS_PER_DEVICE, HELDOUT, TEST_FRACTION, BATCH = 6, 8, 50, 0.3, 32
FAR = 1e-3


def log(msg: str) -> None:
    print(f"[finetune-study] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the cache


def build_cache(checkpoint: Path, lfw: Path, celeba: Path, out: Path) -> None:
    """level1 outputs (float16) of every CelebA image (and its mirror) and of LFW folds 4-5 and 6-10."""
    import torch

    from facefl.checkpoint import load_checkpoint
    from facefl.data import ImageFolder, preprocessing_for
    from facefl.data.protocol import load_identities
    from facefl.evaluation import VerificationSet
    from facefl.models import backbone_from_weights

    ckpt = load_checkpoint(checkpoint)
    if ckpt.architecture != "dlib-resnet":
        raise SystemExit(f"{checkpoint}: the study splits dlib-resnet only, not {ckpt.architecture}")
    model = backbone_from_weights(ckpt.architecture, ckpt.embedding_dim, ckpt.tensors).eval()
    prep = preprocessing_for(ckpt.architecture)

    def frozen(images: np.ndarray, mirror: bool = False) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 64):
                x = torch.from_numpy(prep.batch(images[i : i + 64]))
                x = model.stem(x.flip(3) if mirror else x)
                for name in ("level4", "level3", "level2", "level1"):
                    x = getattr(model, name)(x)
                out.append(x.half().numpy())
        return np.concatenate(out)

    data: dict[str, np.ndarray] = {}
    for split, folds in (("val", (4, 5)), ("test", (6, 7, 8, 9, 10))):
        vset = VerificationSet.from_dir(lfw, ckpt.image_size, test_folds=folds)
        t0 = time.perf_counter()
        data[f"lfw_{split}"] = frozen(vset.images)
        data[f"lfw_{split}_index"], data[f"lfw_{split}_same"] = vset.index, vset.is_same
        data[f"lfw_{split}_folds"] = vset.folds
        log(f"LFW folds {folds}: {len(vset.images)} images, {time.perf_counter() - t0:.0f} s")
    images, labels = load_identities(celeba, list(ImageFolder(celeba).identities), ckpt.image_size)
    t0 = time.perf_counter()
    data["celeba"], data["celeba_mirror"], data["celeba_labels"] = (
        frozen(images),
        frozen(images, True),
        labels,
    )
    log(f"CelebA: {len(images)} images and their mirrors, {time.perf_counter() - t0:.0f} s")
    np.savez(out, **data)


# ------------------------------------------------------------------------------------------ the study


class Study:
    def __init__(
        self,
        checkpoint: Path,
        cache: Path,
        celeba: Path,
        split: str,
        devices: int = DEVICES,
        ids_per_device: int = IDS_PER_DEVICE,
        exclude: tuple[str, ...] = (),
    ) -> None:
        import torch

        from facefl.checkpoint import load_checkpoint
        from facefl.data import ImageFolder
        from facefl.models import backbone_from_weights

        ckpt = load_checkpoint(checkpoint)
        full = backbone_from_weights(ckpt.architecture, ckpt.embedding_dim, ckpt.tensors)

        class Top(torch.nn.Module):  # the trainable groups, on cached level1 outputs
            def __init__(self) -> None:
                super().__init__()
                self.level0, self.fc = copy.deepcopy(full.level0), copy.deepcopy(full.fc)

            def raw(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(self.level0(x).mean(dim=(2, 3)))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.normalize(self.raw(x), dim=1)

        self.base = Top()
        self.split, self.exclude = split, set(exclude)
        self.devices, self.ids_per_device = devices, ids_per_device
        self.folder = ImageFolder(celeba)
        self.names = list(self.folder.identities)
        c = dict(np.load(cache))
        self.x, self.x_mirror, self.labels = c["celeba"], c["celeba_mirror"], c["celeba_labels"]
        self.lfw = torch.from_numpy(c[f"lfw_{split}"].astype(np.float32))
        self.lfw_index, self.lfw_same = c[f"lfw_{split}_index"], c[f"lfw_{split}_same"]
        self.lfw_folds = c[f"lfw_{split}_folds"]

    def plan(self, seed: int) -> tuple[list[dict[str, Any]], list[str], np.ndarray]:
        """The seed's devices (val: identities the strong plan of this seed leaves unused), the plan's
        held-out identities (the stand-in public set) and the rows of the strangers: faces of people on
        no device, impostors for every device (val: the unused identities no device drew; test: the
        held-out ones, as in ``benchmarks/accuracy.py``), less ``--exclude``."""
        from facefl.data.protocol import device_split, plan_devices

        n, k = self.devices, self.ids_per_device
        p = plan_devices(self.folder, n, k, HELDOUT, seed, exclude=self.exclude)
        groups, stranger_names = p.devices, list(p.heldout)
        if self.split == "val":
            # the identities the strong profile's plan (6 x 8 + 50 held out) of this seed leaves unused
            strong = plan_devices(self.folder, DEVICES, IDS_PER_DEVICE, HELDOUT, seed, exclude=self.exclude)
            used = {n for d in strong.devices for n in d} | set(strong.heldout)
            rest = [n for n in self.names if n not in used and n not in self.exclude]
            if len(rest) < n * k:
                raise SystemExit(f"--split val has {len(rest)} unused identities, fewer than {n} x {k}")
            pick = [str(n) for n in np.random.default_rng(1000 + seed).permutation(rest)]
            groups = [pick[i * k : (i + 1) * k] for i in range(n)]
            stranger_names = pick[n * k :]
        devices, offset = [], 0
        for names in groups:
            index = [self.names.index(n) for n in names]
            rows = np.flatnonzero(np.isin(self.labels, index))
            remap = {g: i for i, g in enumerate(index)}
            local = np.array([remap[int(g)] for g in self.labels[rows]])
            train, test = device_split(local, TEST_FRACTION, seed, names)
            devices.append(
                {"train": rows[train], "test": rows[test], "train_y": local[train], "test_y": local[test],
                 "offset": offset}
            )  # fmt: skip
            offset += len(names)
        strangers = np.flatnonzero(np.isin(self.labels, [self.names.index(n) for n in stranger_names]))
        return devices, list(p.heldout), strangers

    def embed(self, model: Any, x: np.ndarray) -> np.ndarray:
        import torch

        model.eval()
        with torch.no_grad():
            t = torch.from_numpy(np.asarray(x, np.float32))
            return torch.cat([model(t[i : i + 512]) for i in range(0, len(t), 512)]).numpy()

    def evaluate(
        self, models: list[Any], devices: list[dict[str, Any]], strangers: np.ndarray
    ) -> dict[str, float]:
        """Device columns twice: against the other devices' test images only (``device_*``, the
        protocol of the first studies), and with the strangers as impostors too (``*_strangers``)."""
        from facefl.device_metrics import OTHERS_ONLY, personalized_report
        from facefl.metrics import cosine_scores, verification_report

        def device_of(key: str) -> np.ndarray:
            return np.concatenate([np.full(len(d[key]), i) for i, d in enumerate(devices)])

        def ids(key: str) -> np.ndarray:
            return np.concatenate([d[f"{key}_y"] + d["offset"] for d in devices])

        per_device = []
        for k, model in enumerate(models):
            train = np.concatenate([self.embed(model, self.x[d["train"]]) for d in devices])
            test = np.concatenate([self.embed(model, self.x[d["test"]]) for d in devices])
            r = personalized_report(
                train, ids("train"), device_of("train"), test, ids("test"), device_of("test"), (FAR,),
                stranger_emb=self.embed(model, self.x[strangers]),
            )  # fmt: skip
            if len(models) == 1:
                per_device = r["per_device"]
                break
            per_device.append(next(e for e in r["per_device"] if e["device"] == k))
        e = self.embed(models[0], self.lfw.numpy())
        g = verification_report(
            cosine_scores(e[self.lfw_index[:, 0]], e[self.lfw_index[:, 1]]), self.lfw_same, self.lfw_folds
        )
        return {
            "device_tar": float(np.mean([r[f"{OTHERS_ONLY}tar@far=1e-3"] for r in per_device])),
            "device_dir": float(np.mean([r[f"{OTHERS_ONLY}dir@far=1e-3"] for r in per_device])),
            "device_tar_strangers": float(np.mean([r["tar@far=1e-3"] for r in per_device])),
            "device_dir_strangers": float(np.mean([r["dir@far=1e-3"] for r in per_device])),
            "lfw_accuracy": float(g["accuracy"]),
            "lfw_tar": float(g["tar@far=1e-3"]),
        }

    def bank(self, model: Any, heldout: list[str]) -> Any:
        import torch
        import torch.nn.functional as F

        index = [self.names.index(n) for n in heldout]
        rows = np.flatnonzero(np.isin(self.labels, index))
        emb = torch.from_numpy(self.embed(model, self.x[rows]))
        lab = torch.from_numpy(self.labels[rows])
        return torch.stack([F.normalize(emb[lab == c].mean(0), dim=0) for c in index])

    def public_bank(self, model: Any, heldout: list[str], s: Setting) -> Any:
        """CosFace: the public prototypes; metric: the public images and their identities."""
        import torch

        if not s.public:
            return None
        if s.loss == "cosface":
            return self.bank(model, heldout)
        index = [self.names.index(n) for n in heldout]
        rows = np.flatnonzero(np.isin(self.labels, index))
        images = torch.from_numpy(self.x[rows].astype(np.float32))
        return images, torch.from_numpy(self.labels[rows] + 100_000)

    def train_device(
        self, model: Any, device: dict[str, Any], s: Setting, epochs: int, gen: Any, head_rows: Any, bank: Any
    ) -> tuple[Any, Any]:
        import torch
        import torch.nn.functional as F

        from facefl.losses import pair_margin_loss
        from facefl.models import CosFaceHead

        model = copy.deepcopy(model)
        x = torch.from_numpy(self.x[device["train"]].astype(np.float32))
        x_mirror = torch.from_numpy(self.x_mirror[device["train"]].astype(np.float32))
        y = torch.from_numpy(device["train_y"]).long()
        classes = int(y.max()) + 1
        head = CosFaceHead(128, classes, 30.0, s.margin)
        with torch.no_grad():
            if head_rows is None:  # imprinted from the class means, as the SDK does
                emb = torch.from_numpy(self.embed(model, x.numpy()))
                head_rows = torch.stack([F.normalize(emb[y == c].mean(0), dim=0) for c in range(classes)])
            head.weight.copy_(head_rows)
            if bank is not None and s.hard_strangers:
                own = torch.from_numpy(self.embed(model, x.numpy()))
                means = F.normalize(torch.stack([own[y == c].mean(0) for c in range(classes)]), dim=1)
                near = (torch.from_numpy(self.embed(model, bank[0].numpy())) @ means.T).max(1).values
                top = torch.topk(near, min(s.hard_strangers, len(near))).indices
                bank = bank[0][top], bank[1][top]
        params = list((model.fc if s.fc_only else model).parameters()) + list(head.parameters())
        opt = (
            torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=5e-4)
            if s.optimizer == "sgd"
            else torch.optim.Adam(params, lr=s.lr)
        )
        model.train()
        n = len(y)
        for _ in range(epochs):
            perm, mirror = torch.randperm(n, generator=gen), torch.rand(n, generator=gen) < 0.5
            for idx in torch.tensor_split(perm, max(1, -(-n // BATCH))):
                if len(idx) < 2:
                    continue
                batch = torch.where(mirror[idx][:, None, None, None], x_mirror[idx], x[idx])
                if s.loss == "metric":
                    emb, labels, strangers = model.raw(batch), y[idx], None
                    if bank is not None:  # strangers: a batch of public images, their own identities
                        pick = torch.randint(len(bank[1]), (BATCH,), generator=gen)
                        strangers = model.raw(bank[0][pick])
                        if not s.strangers_only_negative:
                            emb = torch.cat([emb, strangers])
                            labels = torch.cat([labels, bank[1][pick]])
                    loss = pair_margin_loss(
                        emb, labels, margin=s.pair_margin, hardest_negatives=not s.all_negatives
                    )
                    if strangers is not None and s.strangers_only_negative:
                        # the mean over violating (device image, stranger) pairs, added to dlib's loss
                        hinge = torch.relu(0.6 + s.pair_margin - torch.cdist(emb, strangers))
                        loss = loss + hinge.sum() / max(int((hinge > 0).sum()), 1)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    continue
                emb = model(batch)
                logits = head(emb, y[idx])
                if s.public:  # FedFR's union logits: public prototypes as extra negative classes
                    logits = torch.cat([logits, head.scale * emb @ bank.T], 1)
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model, head.weight.detach().clone()

    def run(self, s: Setting, seed: int) -> dict[str, float]:
        import torch

        devices, heldout, strangers = self.plan(seed)
        gen = torch.Generator().manual_seed(seed)
        if s.local:
            bank = self.public_bank(self.base, heldout, s)
            models = [
                self.train_device(self.base, d, s, s.rounds * s.epochs, gen, None, bank)[0] for d in devices
            ]
            return self.evaluate(models, devices, strangers)
        model, heads = copy.deepcopy(self.base), [None] * len(devices)
        weights = np.array([len(d["train"]) for d in devices], float)
        weights /= weights.sum()
        for _ in range(s.rounds):
            bank = self.public_bank(model, heldout, s)
            local = []
            for k, d in enumerate(devices):
                m, heads[k] = self.train_device(model, d, s, s.epochs, gen, heads[k], bank)
                local.append(m.state_dict())
            model.load_state_dict(
                {k: sum(w * sd[k] for w, sd in zip(weights, local, strict=True)) for k in local[0]}
            )
        if s.personalize_epochs:  # LFW is then device 0's model, as for ``local``
            bank = self.public_bank(model, heldout, s)
            models = [
                self.train_device(model, d, s, s.personalize_epochs, gen, heads[k], bank)[0]
                for k, d in enumerate(devices)
            ]
            return self.evaluate(models, devices, strangers)
        return self.evaluate([model], devices, strangers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="the imported dlib-resnet checkpoint")
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "finetune_study_cache.npz")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--configs", default=",".join(SETTINGS), help=f"comma-separated of {', '.join(SETTINGS)}")
    p.add_argument("--devices", type=int, default=DEVICES, help="devices in the federation")
    p.add_argument("--ids-per-device", type=int, default=IDS_PER_DEVICE)
    p.add_argument(
        "--exclude",
        default=",".join(EXCLUDED_IDENTITIES),
        help=(
            "comma-separated CelebA identities left out of every plan (the strong profile's too, as "
            "benchmarks/accuracy.py's EXCLUDED_IDENTITIES): default those"
        ),
    )
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--lfw", type=Path, default=SHARED / "lfw")
    p.add_argument("--devices-data", type=Path, default=SHARED / "celeba")
    p.add_argument(
        "--json", type=Path, default=None, help="default: benchmarks/results/finetune_study-SPLIT.json"
    )
    args = p.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    import torch

    torch.set_num_threads(args.threads)
    if not args.cache.exists():
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        build_cache(args.checkpoint, args.lfw, args.devices_data, args.cache)
    study = Study(
        args.checkpoint,
        args.cache,
        args.devices_data,
        args.split,
        args.devices,
        args.ids_per_device,
        tuple(n for n in args.exclude.split(",") if n),
    )
    settings = [SETTINGS[c] for c in args.configs.split(",")]
    results: dict[str, list[dict[str, float]]] = {"pretrained": []}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        devices, _, strangers = study.plan(seed)
        results["pretrained"].append(study.evaluate([study.base], devices, strangers))
        for s in settings:
            results.setdefault(s.name, []).append(study.run(s, seed))
        log(f"seed {seed} done")
    metrics = list(results["pretrained"][0])
    lines = [
        f"{args.split}: mean over {args.seeds} seeds; in brackets the change against pretrained, mean +- std",
        "",
        "| setting | " + " | ".join(metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for name, rows in results.items():
        cells = []
        for m in metrics:
            delta = np.array([r[m] - b[m] for r, b in zip(rows, results["pretrained"], strict=True)])
            mean = np.mean([r[m] for r in rows])
            cells.append(
                f"{mean:.4f}"
                if name == "pretrained"
                else f"{mean:.4f} ({delta.mean():+.4f} ± {delta.std():.4f})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    suffix = f"-seeds{args.first_seed}-{args.first_seed + args.seeds - 1}" if args.first_seed else ""
    if (args.devices, args.ids_per_device) != (DEVICES, IDS_PER_DEVICE):
        suffix += f"-{args.devices}x{args.ids_per_device}"
    out = args.json or REPO / "benchmarks" / "results" / f"finetune_study-{args.split}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"split": args.split, "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
             "devices": args.devices, "ids_per_device": args.ids_per_device, "exclude": args.exclude,
             "settings": [asdict(s) for s in settings],
             "results": results, "table": lines},
            indent=2,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
