"""The accuracy table: pretrained only, local-only, FedAvg, FedProx, the server optimizers FedAvgM,
FedAdam and FedYogi, FedFace, FedFR (+ ablations).

    python benchmarks/accuracy.py --profile cpu      # small model, 64x64, 2 CPU cores
    python benchmarks/accuracy.py --profile paper    # MobileFaceNet, 112x112 (for a GPU)
    python benchmarks/accuracy.py --profile smoke --lfw DIR --devices-data DIR   # tiny, minutes
    python benchmarks/accuracy.py --profile strong         # dlib-resnet as imported, ~60 min on 2 CPU cores
    python benchmarks/accuracy.py --profile strong-smoke   # its plumbing end to end, a few minutes
    python benchmarks/accuracy.py --profile strong-18      # 18 devices, pretrained vs dlib's loss only

Protocol (docs/architecture.md, "Evaluation protocol"): the model is pretrained on the LFW public split
(identities of pair folds 1-5 and of no fold); generic = LFW pair folds 6-10 (never trained on); devices =
CelebA identities, each identity's images split into the device's training and test images
(facefl.data.protocol, the same plan the simulator uses). Every row starts from the same pretrained
checkpoint:
- pretrained only: the checkpoint as is, on every device;
- local-only: each device fine-tunes the checkpoint alone on its own images, with the same total local
  compute as it gets in the federated run (rounds x local epochs), and is tested with its own model;
- FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedFace, FedFR, FedFR without DFC, FedFR without the
  contrastive term: each a `facefl simulate` run against a real uvicorn server (SQLite) that evaluates
  every new model version on LFW folds 6-10 itself (generic columns: the final global model).
  Personalized columns: FedFR's devices use their own personalized model (their backbone after local
  training + the DFC converter, read from each simulated device's state directory); the other methods
  use the final global model on every device. FedFace trains one identity per device: the same
  identities, each on its own device, with the same train/test images
  (facefl.data.protocol.device_split is keyed on identity names).
Device impostors are the other devices' test images and the plan's held-out people ("strangers",
facefl.evaluation.load_device_protocol); the ``no strangers`` columns leave the latter out. Every plan
leaves out the audited CelebA defects (``EXCLUDED_IDENTITIES``).
Hyper-parameters come from the profile and the papers; none is chosen by looking at folds 6-10.
Writes a markdown table to stdout, JSON and per-round curves (PNG) to --out.

The ``strong`` profiles start from a strong pretrained network instead of pretraining one: dlib's face
ResNet (``dlib-resnet``, 150x150), imported with ``facefl import-model dlib-resnet`` (or ``--pretrained``).
Every row fine-tunes only a few parameter groups (``trainable``; local-only too) and every federated task
has a release gate on LFW accuracy (``gate``): a version that loses more than ``max_drop`` against the
served one is held back, and the ``served`` column says which version devices get then. Columns are at
FAR 1e-3. Compute bounds, so that ``strong`` fits in 60 minutes on 2 CPU cores (dlib-resnet evaluates
LFW folds 6-10 in about a minute there, and the server evaluates every version):

- ``trainable = ("level0", "fc")``: dlib's last residual stage (one downsampling block, 256 channels at
  2x2) and the final linear layer, 1.2M of 5.6M parameters. Back-propagation stops there, so a step
  costs little more than a forward pass, the upload is ~4.7 MB instead of 22 MB, and a few hundred
  CelebA images cannot move the features of the early layers that 3M training faces shaped;
- 6 devices x 8 identities, 3 rounds, 1 local epoch (FedFace: the same 48 identities, one per device);
- FedFR's public set: ``public_images`` images of the LFW public split (spread over identities with
  ``export.threshold.spread_sample``, written as an image folder of links) instead of its ~7,000: the
  server embeds the public set for every version's feature bank, and every device downloads it;
- local-only: LFW accuracy averaged over the first ``local_generic_devices`` devices' models (each
  would otherwise cost a minute of LFW evaluation); device metrics use every device's own model;
- lr 1e-5, chosen with ``benchmarks/strong_lr.py`` on LFW validation folds 4-5 (never 6-10): the largest
  of 1e-2, 1e-3, 3e-4, 1e-4, 1e-5 whose local fine-tuning stays within the gate's max_drop there. dlib's
  batch norm is folded into per-channel affine scales of ~6-9, which leaves the convolution weights at
  ~1e-3: an SGD step that suits ``small`` from scratch (the ``cpu`` profile's 0.01) wrecks them;
- batch size, local epochs, FedProx mu, FedFR's weights: the ``cpu`` profile's and the papers' values.

``strong-18`` is ``strong`` with 18 devices x 8 identities (144 CelebA people federating) and only the
pretrained and ``FedAvg (dlib's loss)`` rows: on validation identities (``benchmarks/finetune_study.py
--devices 6|12|18``) that row's device DIR gain over pretrained grew beyond its spread over plans only
with 18 devices, and the whole table at that size would not fit the 60 minutes.

``strong-smoke`` (two methods, 2 devices, 1 round) also evaluates on a small LFW subset:
``eval_pairs_per_fold`` same and as many different pairs of each fold (links to the same images), so its
LFW numbers are not comparable with the full folds 6-10.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    # the strong profiles (module docstring): "dlib-resnet" imports that pretrained network instead of
    # pretraining; parameter groups trained; release gate "METRIC:MAX_DROP"; compute bounds
    import_pretrained: str | None = None
    trainable: tuple[str, ...] | None = None
    gate: str | None = None
    public_images: int | None = None
    local_generic_devices: int | None = None
    eval_pairs_per_fold: int | None = None
    methods: tuple[str, ...] | None = None  # the profile's default rows (None: all)
    fars: str = "1e-2"  # FAR of the table's TAR / DIR columns
    seed: int = 0  # the device plan's seed (which people each device holds, their train/test split)
    local_only: bool = True  # the local-only row (on dlib-resnet it costs ~5 minutes)


@dataclass(frozen=True)
class Method:
    """A federated row: the task's algorithm and extra hyper-parameters."""

    name: str
    algorithm: str
    hyperparams: tuple[tuple[str, float | str], ...] = ()
    mu: float | None = None
    weight_decay: float | None = None  # None: the simulator's default


DLIB_LOSS = "FedAvg (dlib's loss)"
METHODS = (
    Method("FedAvg", "fedavg"),
    Method("FedProx", "fedprox", mu=0.01),
    # server-side optimizers (Reddi et al., 2021) with their modules' defaults, FedAvg's local update
    Method("FedAvgM", "fedavgm"),
    Method("FedAdam", "fedadam"),
    Method("FedYogi", "fedyogi"),
    Method("FedFace", "fedface"),
    Method("FedFR", "fedfr"),
    Method("FedFR w/o DFC", "fedfr", (("dfc_weight", 0.0),)),
    Method("FedFR w/o contrastive", "fedfr", (("contrastive_weight", 0.0),)),
    # dlib-resnet only: fine-tuned with the loss it was trained with (benchmarks/finetune_study.py chose
    # Adam at the profile's lr on validation identities); its distances are in dlib's units
    Method(DLIB_LOSS, "fedavg", (("loss", "pair_margin"), ("optimizer", "adam")), weight_decay=0.0),
)


# CelebA folders that `facefl audit-data` flagged with the imported dlib-resnet and that were confirmed
# by looking at them (benchmarks/results/celeba_audit.json, celeba_audit.png): 07393 files 07392's
# person again; 07312, 07316, 07319 and 07404 each mix several people. Left out of every plan: a device
# whose person appears again among the strangers, or whose template averages several people, has its DIR
# set by the data whatever the model. Flagged but kept, as not clearly defective to the eye: 07291 (one
# person), 07223 / 07301, 07371 / 07382 and 07310 / 07312 (look-alikes, not evidently one person).
EXCLUDED_IDENTITIES = ("07393", "07312", "07316", "07319", "07404")

# the rows of the first table (the smoke profile's, which tests/benchmarks/test_accuracy.py runs)
CLASSIC = ("FedAvg", "FedProx", "FedFace", "FedFR", "FedFR w/o DFC", "FedFR w/o contrastive")
# the small-model profiles' rows: every method but the one in dlib's units
FROM_SCRATCH = tuple(m.name for m in METHODS if m.name != DLIB_LOSS)

PROFILES = {
    "smoke": Profile("small", 2, 4, 3, 2, 2, 1, 0.01, 16, 0.34, methods=CLASSIC),
    # 0 epochs: the pretrain CLI's default
    "cpu": Profile("small", 0, 30, 8, 50, 5, 1, 0.01, 32, 0.3, methods=FROM_SCRATCH),
    "paper": Profile("mobilefacenet", 0, 30, 8, 50, 10, 2, 0.01, 32, 0.3, methods=FROM_SCRATCH),
    # lr 1e-5: benchmarks/strong_lr.py on LFW validation folds 4-5 (benchmarks/results/strong_lr.json)
    "strong": Profile(
        "dlib-resnet", 0, 6, 8, 50, 3, 1, 1e-5, 32, 0.3,
        import_pretrained="dlib-resnet", trainable=("level0", "fc"), gate="accuracy:0.003",
        public_images=1000, local_generic_devices=2, fars="1e-3",
        methods=(*CLASSIC, DLIB_LOSS),
    ),
    "strong-18": Profile(
        "dlib-resnet", 0, 18, 8, 50, 3, 1, 1e-5, 32, 0.3,
        import_pretrained="dlib-resnet", trainable=("level0", "fc"), gate="accuracy:0.003",
        fars="1e-3", methods=(DLIB_LOSS,), local_only=False,
    ),
    "strong-smoke": Profile(
        "dlib-resnet", 0, 2, 4, 20, 1, 1, 1e-5, 32, 0.3, images_per_id=10,
        import_pretrained="dlib-resnet", trainable=("level0", "fc"), gate="accuracy:0.003",
        public_images=200, local_generic_devices=1, eval_pairs_per_fold=20, methods=("FedAvg", "FedFR"),
        fars="1e-3",
    ),
}  # fmt: skip


@dataclass
class Row:
    name: str
    generic: dict[str, float]
    personalized: dict[str, float]
    seconds: float
    served: str = ""  # federated rows with a release gate: the version devices get, when one was held back


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


def import_pretrained(architecture: str, out: Path) -> Path:
    ckpt = out / f"imported-{architecture}.safetensors"
    cmd = [sys.executable, "-m", "facefl", "import-model", architecture, "--out", str(ckpt)]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, cwd=REPO)
    return ckpt


def small_lfw(lfw: Path, pairs_per_fold: int, out: Path) -> Path:
    """An LFW-layout folder with the first ``pairs_per_fold`` same and different pairs of each fold of
    ``lfw`` (identity folders are links): a quick evaluation set for smoke runs."""
    from facefl.data.lfw import PAIRS_FILE

    lines = (lfw / PAIRS_FILE).read_text().splitlines()
    folds, per_fold = (int(x) for x in lines[0].split())
    k = min(pairs_per_fold, per_fold)
    keep = [lines[0].split()[0] + f"\t{k}"]
    for f in range(folds):
        start = 1 + f * 2 * per_fold
        keep += lines[start : start + k] + lines[start + per_fold : start + per_fold + k]
    root = out / f"lfw-{k}-pairs-per-fold"
    root.mkdir(parents=True, exist_ok=True)
    for d in lfw.iterdir():
        if d.is_dir() and not (root / d.name).exists():
            (root / d.name).symlink_to(d.resolve(), target_is_directory=True)
    (root / PAIRS_FILE).write_text("\n".join(keep) + "\n")
    return root


def capped_public_set(lfw: Path, limit: int, out: Path) -> Path:
    """An image folder of links to ``limit`` images of ``lfw``'s public split (test folds excluded),
    spread over identities (``export.threshold.spread_sample``: genuine pairs kept)."""
    from export.threshold import spread_sample
    from facefl.data.lfw import LfwProtocol

    listing = LfwProtocol.from_root(lfw).public_images(1)
    root = out / f"lfw-public-{limit}"
    for i in spread_sample(listing.labels, limit):
        path = listing.paths[int(i)]
        link = root / listing.identities[int(listing.labels[i])] / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(path.resolve())
    return root


def excluded_identities(data: Path) -> tuple[str, ...]:
    """The audited defects (EXCLUDED_IDENTITIES) that are folders of ``data`` (none in generated data)."""
    return tuple(name for name in EXCLUDED_IDENTITIES if (data / name).is_dir())


def evaluate_rows(
    profile: Profile,
    ckpt: Path,
    lfw: Path,
    celeba: Path,
    out: Path,
    methods: tuple[Method, ...] = METHODS,
    public: Path | None = None,
) -> dict[str, Any]:
    import torch

    from device_sdk import LocalDataset, Trainer
    from facefl import codec
    from facefl.checkpoint import load_checkpoint
    from facefl.embedders import TorchEmbedder
    from facefl.evaluation import (
        VerificationSet,
        evaluate_personalized,
        evaluate_verification,
        load_device_protocol,
    )
    from facefl.models import backbone_from_weights

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    excluded = excluded_identities(celeba)
    checkpoint = load_checkpoint(ckpt)
    image_size = checkpoint.image_size
    vset = VerificationSet.from_dir(lfw, image_size)
    devices, strangers = load_device_protocol(
        celeba,
        num_devices=profile.devices,
        ids_per_device=profile.ids_per_device,
        heldout_ids=profile.heldout_ids,
        test_fraction=profile.test_fraction,
        seed=profile.seed,
        image_size=image_size,
        max_images_per_identity=profile.images_per_id,
        exclude=excluded,
    )
    log(f"strangers: {len(strangers)} images of the plan's held-out people")

    def embedder_for(weights: dict[str, np.ndarray]) -> TorchEmbedder:
        model = backbone_from_weights(checkpoint.architecture, checkpoint.embedding_dim, weights)
        return TorchEmbedder(model.eval(), checkpoint.architecture)

    rows: list[Row] = []
    t0 = time.perf_counter()
    base = embedder_for(checkpoint.tensors)
    generic_base = evaluate_verification(base, vset)
    personal_base = evaluate_personalized(base, devices, strangers=strangers)
    log(f"pretrained evaluated ({time.perf_counter() - t0:.0f} s)")
    rows.append(Row("pretrained only", generic_base, personal_base, time.perf_counter() - t0))
    log(f"pretrained only: {rows[-1].generic['accuracy']:.4f}")

    # local-only: the same local compute as the federated run gives a device, but alone
    if profile.local_only:
        t0 = time.perf_counter()
        trainer = Trainer(num_threads=min(2, os.cpu_count() or 1))
        spec = _Assignment(checkpoint.architecture, checkpoint.embedding_dim, profile)
        local = []
        for d in devices:
            labels = d.train_labels - d.train_labels.min()
            dataset = LocalDataset.from_arrays(d.train_images, labels)
            result = trainer.train(spec, checkpoint.tensors, dataset, state_dir=None, seed=d.device)
            local.append(embedder_for(codec.apply_delta(checkpoint.tensors, result.delta)))
        # a cap on the LFW evaluations (a minute each for dlib-resnet on 2 cores); device metrics use all
        scored = local[: profile.local_generic_devices or len(local)]
        generic = [evaluate_verification(e, vset) for e in scored]
        rows.append(
            Row(
                "local-only",
                {k: float(np.mean([g[k] for g in generic])) for k in generic[0]},
                evaluate_personalized(local, devices, strangers=strangers),
                time.perf_counter() - t0,
            )
        )
        log(f"local-only: {rows[-1].generic['accuracy']:.4f}")

    curves: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        t0 = time.perf_counter()
        final, method_curves = run_federated(
            method, profile, ckpt, lfw, celeba, out, (devices, strangers), embedder_for, public or lfw
        )
        method_curves[0]["personalized"] = _flat(personal_base)  # round 0: the pretrained checkpoint
        rows.append(
            Row(method.name, final[0], final[1], time.perf_counter() - t0, served_cell(method_curves))
        )
        log(f"{method.name}: {rows[-1].generic.get('accuracy', float('nan')):.4f} ({rows[-1].seconds:.0f} s)")
        curves[method.name] = method_curves
        if method.name == "FedFR":  # what its global model alone gives the devices (no personalization)
            global_only = method_curves[-1]["personalized_global"]
            rows.append(Row("FedFR, global model only", final[0], global_only, 0.0, rows[-1].served))
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

    @property
    def trainable_prefixes(self) -> tuple[str, ...] | None:
        from facefl.models import resolve_trainable

        return resolve_trainable(self.architecture, self.profile.trainable)


def served_cell(curves: list[dict[str, Any]]) -> str:
    """Which version devices get after the last round (with its LFW accuracy), when the release gate held
    any version back; "" when every version was served."""
    held = [c for c in curves[1:] if c.get("served_version") not in (None, c.get("model_version"))]
    if not held:
        return ""
    served = curves[-1].get("served_version")
    accuracy = {c.get("model_version"): (c.get("generic") or {}).get("accuracy") for c in curves[1:]}
    # a version no round of this run produced: the initial model (round 0)
    acc = accuracy.get(served, (curves[0].get("generic") or {}).get("accuracy"))
    acc_text = f" (LFW acc {acc:.4f})" if acc is not None else ""
    return f"v{served}{acc_text}; held back: " + ", ".join(f"v{c['model_version']}" for c in held)


def run_federated(
    method: Method,
    profile: Profile,
    ckpt: Path,
    lfw: Path,
    celeba: Path,
    out: Path,
    device_data: tuple[Any, Any],
    embedder_for: Any,
    public: Path | None = None,
) -> tuple[tuple[dict[str, float], dict[str, float]], list[dict[str, Any]]]:
    """``device_data``: the devices and the strangers' images (facefl.evaluation.load_device_protocol)."""
    from device_sdk import AdminClient, load_personalized_model
    from facefl.algorithms import registry
    from facefl.embedders import TorchEmbedder
    from facefl.evaluation import evaluate_personalized
    from simulator import SimulationConfig, simulate
    from simulator.server import LocalServer

    devices, strangers = device_data
    admin = "bench-admin-token"
    # what the algorithm declares in the registry, not its name: FedFace's one identity per device,
    # FedFR's public face set (its devices also keep a personalized model)
    algorithm = registry.get(method.algorithm)
    fedface = algorithm.one_identity_per_device
    fedfr = "public_set" in algorithm.hyperparams.model_fields
    slug = re.sub(r"[^a-z0-9-]", "", method.name.lower().replace(" ", "-"))  # a plain file name
    hyperparams = dict(method.hyperparams)
    if fedfr:
        hyperparams.setdefault("max_hard_negatives", profile.max_hard_negatives)
    env = {"FACEFL_EVAL_SETS": json.dumps({"lfw": str(lfw.resolve())})}
    if fedfr:
        env["FACEFL_PUBLIC_SETS"] = json.dumps({"lfw-public": str((public or lfw).resolve())})
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
                exclude_identities=excluded_identities(celeba),
                server=server.base_url,
                admin_token=admin,
                enrollment_secret="bench-enrollment-secret",
                local_epochs=profile.local_epochs,
                batch_size=profile.batch_size,
                lr=profile.lr,
                algorithm=method.algorithm,
                mu=method.mu,
                seed=profile.seed,
                weight_decay=(
                    SimulationConfig.weight_decay if method.weight_decay is None else method.weight_decay
                ),
                public_set="lfw-public" if fedfr else None,
                extra_hyperparams=hyperparams,
                eval_set="lfw",
                trainable=list(profile.trainable) if profile.trainable else None,
                gate=profile.gate,
                initial_model=str(ckpt),
                json_path=str(out / f"{slug}-simulate.json"),
                work_dir=tmp,  # kept until the end of this block: FedFR's personal models live there
                progress=False,
            )
        )
        print(result.table(), file=sys.stderr)
        run_dirs = sorted(Path(tmp).glob("run-*"))
        curves = []
        with AdminClient(server.base_url, admin, timeout=120) as admin_client:
            for r in result.rounds:
                weights = admin_client.download_model(r.model_version)
                personal = evaluate_personalized(embedder_for(weights), devices, strangers=strangers)
                curves.append(
                    {
                        "round": r.round,
                        "status": r.status,
                        "model_version": r.model_version,
                        "served_version": r.served_version,
                        "generic": r.generic,
                        "personalized": _flat(personal),
                    }
                )
        if fedfr and run_dirs:
            # each device's own model after its last round (the simulator's device i is plan device i)
            per_device = [
                TorchEmbedder(
                    load_personalized_model(run_dirs[-1] / "devices" / str(d.device) / "state"),
                    profile.model,
                )
                for d in devices
            ]
            curves[-1]["personalized_global"] = curves[-1]["personalized"]  # the global model, for contrast
            personal = evaluate_personalized(per_device, devices, strangers=strangers)
            curves[-1]["personalized"] = _flat(personal)
            curves[-1]["personalized_model"] = "device backbone + DFC converter"
    final = curves[-1]
    return (final["generic"] or {}, final["personalized"]), [
        {"round": 0, "generic": result.initial_generic, "personalized": None},
        *curves,
    ]


def _flat(report: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in report.items() if k != "per_device"}


def columns(far: str = "1e-2") -> list[tuple[str, str, str]]:
    return [
        ("generic", "accuracy", "LFW acc"),
        ("generic", f"tar@far={far}", f"LFW TAR@{far}"),
        ("personalized", f"tar@far={far}", f"device TAR@{far}"),
        ("personalized", f"dir@far={far}", f"device DIR@{far}"),
        # the same without the strangers: the other devices' test images are the only impostors
        ("personalized", f"others_only/tar@far={far}", "TAR, no strangers"),
        ("personalized", f"others_only/dir@far={far}", "DIR, no strangers"),
    ]


COLUMNS = columns()


def table(rows: list[Row], far: str = "1e-2") -> str:
    cols = columns(far)
    gated = any(r.served for r in rows)
    head = (
        "| method | "
        + " | ".join(c[2] for c in cols)
        + (" | served (gate)" if gated else "")
        + " | seconds |"
    )
    lines = [head, "|---|" + "---:|" * len(cols) + ("---|" if gated else "") + "---:|"]
    for r in rows:
        cells = [f"{getattr(r, sec).get(key, float('nan')):.4f}" for sec, key, _ in cols]
        if gated:
            cells.append(r.served or "last version")
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
    p.add_argument(
        "--pretrained", type=Path, help="use this checkpoint instead of pretraining (or importing)"
    )
    p.add_argument("--out", type=Path, help="results directory (default benchmarks/results/accuracy-PROFILE)")
    p.add_argument("--rounds", type=int, help="override the profile's federated rounds")
    p.add_argument("--seed", type=int, default=0, help="the device plan's seed (default 0)")
    p.add_argument("--no-local-only", action="store_true", help="leave out the local-only row")
    p.add_argument(
        "--methods",
        help="comma-separated federated rows to run (default: the profile's, else all): "
        + ", ".join(m.name for m in METHODS),
    )
    args = p.parse_args(argv)
    by_name = {m.name.lower(): m for m in METHODS}
    profile = PROFILES[args.profile]
    default_methods = profile.methods or tuple(m.name for m in METHODS)
    wanted = [
        name.strip().lower()
        for name in (args.methods or ",".join(default_methods)).split(",")
        if name.strip()
    ]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {[m.name for m in METHODS]}")
    methods = tuple(by_name[name] for name in wanted)
    if args.rounds:
        profile = replace(profile, rounds=args.rounds)
    if args.seed < 0:
        p.error("--seed must be >= 0")
    profile = replace(profile, seed=args.seed, local_only=profile.local_only and not args.no_local_only)
    for name, path in (("--lfw", args.lfw / "pairs.txt"), ("--devices-data", args.devices_data)):
        if not path.exists():
            p.error(f"{name}: {path} not found")
    out = args.out or REPO / "benchmarks" / "results" / f"accuracy-{args.profile}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.pretrained:
        ckpt = args.pretrained
    elif profile.import_pretrained:
        ckpt = import_pretrained(profile.import_pretrained, out)
    else:
        ckpt = pretrain(profile, args.lfw, out)
    lfw = small_lfw(args.lfw, profile.eval_pairs_per_fold, out) if profile.eval_pairs_per_fold else args.lfw
    public = capped_public_set(args.lfw, profile.public_images, out) if profile.public_images else None
    result = evaluate_rows(profile, ckpt, lfw, args.devices_data, out, methods, public)
    rows: list[Row] = result["rows"]
    print(table(rows, profile.fars))
    plot(rows, result["curves"], out / "curves.png")
    report = {
        "profile": args.profile,
        "settings": asdict(profile),
        "checkpoint": str(ckpt),
        "eval_set": str(lfw),
        "public_set": str(public or args.lfw),
        "excluded_identities": list(excluded_identities(args.devices_data)),
        "methods": [m.name for m in methods],
        "rows": [asdict(r) | {"personalized": _flat(r.personalized)} for r in rows],
        "rounds": result["curves"],
        "wall_s": time.perf_counter() - started,
    }
    (out / "accuracy.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    log(f"wrote {out / 'accuracy.json'} and {out / 'curves.png'} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
