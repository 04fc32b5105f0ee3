"""Drive N simulated devices (device_sdk in worker processes) against a real facefl server.

Per run: start a server (or use ``--server``), create a task through the admin API, register the devices,
then for each round dispatch one job per device (check in, train, upload) to a pool of worker processes,
wait until the server closes the round (aggregated or abandoned), and measure rank-1 identification of
the new global model on held-out identities that no device holds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from device_sdk import DeviceCredentials, FederatedClient, LocalDataset, RoundInfo, Trainer
from facefl.algorithms import registry
from facefl.data import ImageFolder, partition_identities
from facefl.data.partition import held_out_count
from facefl.data.protocol import plan_devices
from facefl.models import ARCHITECTURES, resolve_trainable

from .backends import BACKENDS, make_backend, ray_available
from .evaluation import rank1_identification
from .faults import FaultConfig, KillAt, parse_kill_at
from .server import LocalServer
from .worker import (
    CORRUPT_ACCEPTED,
    CORRUPT_REFUSED,
    DROPPED,
    FAILED,
    NOT_SELECTED,
    ROUND_CLOSED,
    UPLOADED,
    DataSpec,
    DeviceJob,
    JobResult,
    run_device_job,
)

__all__ = ["RoundResult", "SimulationConfig", "SimulationError", "SimulationResult", "simulate"]

# synthetic held-out identities are numbered from here: disjoint from every device's identities
HELDOUT_OFFSET = 1_000_000
# how long to wait for the server's evaluation of a new model version (it runs after aggregation)
EVAL_TIMEOUT_S = 600.0


class SimulationError(RuntimeError):
    """The simulation could not run (server failure, bad data directory, task creation refused...)."""


@dataclass
class SimulationConfig:
    """Everything a run depends on; ``validate()`` checks it and fills the derived defaults."""

    devices: int = 20
    rounds: int = 2
    model: str = "small"
    data: str = "synthetic"  # "synthetic" or an image-folder directory
    ids_per_device: int = 5
    images_per_id: int | None = None  # synthetic: 10; folder: all images (a cap when given)
    heldout_ids: int = 50
    # with an image folder: the share of each identity's images kept off training (the device's test
    # images, for personalized evaluation; facefl.data.protocol.device_split with the same seed)
    test_fraction: float = 0.0
    server: str | None = None
    db: str | None = None
    admin_token: str | None = None
    enrollment_secret: str | None = None
    json_path: str | None = None
    workers: int | None = None  # default: CPU count
    seed: int = 0
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    algorithm: str = registry.DEFAULT
    mu: float | None = None  # default: the algorithm's suggestion (FedProx: 0.01); only where it has mu
    # FedFR: the public set (a directory for the server the simulator starts, a name on --server)
    public_set: str | None = None
    # leave out devices with fewer than two training images (FedFace's one-identity devices of a person
    # with a single photo) instead of refusing the plan; the round policy is scaled to those left
    skip_small_devices: bool = False
    # any other task hyper-parameter (validated by the server at task creation)
    extra_hyperparams: dict[str, Any] = field(default_factory=dict)
    target_reports: int | None = None  # default: devices
    min_reports: int | None = None  # default: ceil(target / 2)
    over_selection: float = 1.3
    round_timeout_s: float = 300.0
    dropout: float = 0.0  # probability that a device trains but never uploads
    work_dir: str | None = None
    progress: bool = True
    # server-side generic evaluation of every model version: a directory (LFW layout or image folder)
    # for the server the simulator starts, or the name of a set configured on an external --server
    eval_set: str | None = None
    # start from these weights (a `facefl pretrain` checkpoint) instead of a seeded random model
    initial_model: str | None = None
    # partial training: the architecture's parameter groups that train on the devices (None: all)
    trainable: list[str] | None = None
    # the task's release gate, "METRIC:MAX_DROP" (needs eval_set), e.g. "auc:0.003"
    gate: str | None = None
    # simulated faults (simulator.faults): stragglers train slow_factor times longer; corrupt devices
    # upload garbage; kill_server_at "ROUND:SECONDS" SIGKILLs and restarts the started server
    stragglers: float = 0.0
    slow_factor: float = 3.0
    corrupt: float = 0.0
    kill_server_at: str | None = None
    # where device jobs run: "local" worker processes or "ray" tasks (on ray_address, else a local Ray)
    backend: str = "local"
    ray_address: str | None = None

    @staticmethod
    def _users_of(field_name: str) -> str:
        return " and ".join(
            a.name for a in registry.ALGORITHMS.values() if field_name in a.hyperparams.model_fields
        )

    def hyperparams(self, public_set: str | None) -> dict[str, Any]:
        """The task's hyperparams: the options the algorithm declares (its registry model), then --hp."""
        options: dict[str, Any] = {
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "mu": self.mu,
            "scale": 30.0,
            "margin": 0.4,
            "public_set": public_set if self.public_set is not None else None,
        }
        fields = registry.get(self.algorithm).hyperparams.model_fields
        declared = {k: v for k, v in options.items() if k in fields and v is not None}
        return {**declared, **self.extra_hyperparams}

    def validate(self) -> SimulationConfig:
        """Raise ValueError with a message naming the option; fill derived defaults in place."""

        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(message)

        need(self.devices >= 1, f"--devices must be >= 1 (got {self.devices})")
        need(self.rounds >= 1, f"--rounds must be >= 1 (got {self.rounds})")
        need(
            self.model in ARCHITECTURES,
            f"--model must be one of {', '.join(sorted(ARCHITECTURES))} (got {self.model!r})",
        )
        need(self.ids_per_device >= 1, f"--ids-per-device must be >= 1 (got {self.ids_per_device})")
        if self.images_per_id is None and self.data == "synthetic":
            self.images_per_id = 10
        if self.images_per_id is not None:
            need(self.images_per_id >= 1, f"--images-per-id must be >= 1 (got {self.images_per_id})")
            need(
                self.ids_per_device * self.images_per_id >= 2,
                "each device needs at least two images (--ids-per-device x --images-per-id >= 2)",
            )
        need(self.heldout_ids >= 2, f"--heldout-ids must be >= 2 (got {self.heldout_ids})")
        need(0.0 <= self.test_fraction < 1.0, f"--test-fraction must be in [0, 1) (got {self.test_fraction})")
        if self.data == "synthetic":
            need(
                self.images_per_id is not None and self.images_per_id >= 2,
                "--images-per-id must be >= 2 with synthetic data (held-out gallery + probe)",
            )
        else:
            need(
                Path(self.data).is_dir(),
                f"--data must be 'synthetic' or an existing directory (got {self.data!r})",
            )
        if self.workers is None:
            self.workers = os.cpu_count() or 1
        need(self.workers >= 1, f"--workers must be >= 1 (got {self.workers})")
        need(self.local_epochs >= 1, f"--local-epochs must be >= 1 (got {self.local_epochs})")
        need(self.batch_size >= 2, f"--batch-size must be >= 2 (got {self.batch_size})")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number (got {self.lr})")
        need(
            self.algorithm in registry.NAMES,
            f"--algorithm must be one of {', '.join(registry.NAMES)} (got {self.algorithm!r})",
        )
        algorithm = registry.get(self.algorithm)
        fields = algorithm.hyperparams.model_fields
        users = [a.name for a in registry.ALGORITHMS.values() if "public_set" in a.hyperparams.model_fields]
        need(
            "public_set" not in fields or self.public_set is not None,
            f"--algorithm {self.algorithm} needs --public-set",
        )
        need(
            "public_set" in fields or self.public_set is None,
            f"--public-set applies to {' and '.join(users)} only",
        )
        if self.public_set is not None and self.server is None:
            need(
                Path(self.public_set).is_dir(), f"--public-set must be a directory (got {self.public_set!r})"
            )
        need(
            not algorithm.one_identity_per_device or self.ids_per_device == 1,
            f"--algorithm {self.algorithm} trains one identity per device: use --ids-per-device 1",
        )
        reserved = {"local_epochs", "batch_size", "lr", "momentum", "weight_decay", "mu", "public_set"}
        clash = sorted(reserved & set(self.extra_hyperparams))
        need(not clash, f"--hp cannot set {clash}: use the dedicated options")
        if self.mu is None:
            self.mu = float(algorithm.suggested.get("mu", 0.0)) if "mu" in fields else 0.0
        need(self.mu >= 0, f"--mu must be >= 0 (got {self.mu})")
        need("mu" in fields or self.mu == 0, f"--mu applies to {self._users_of('mu')} only")
        try:  # the algorithm's own checks of the options above (e.g. FedProx: mu > 0)
            algorithm.check_task(algorithm.hyperparams.lenient(self.hyperparams("public")))
        except ValueError as exc:
            need(False, "--algorithm " + _HYPERPARAM.sub(_option, str(exc)))
        if self.target_reports is None:
            self.target_reports = self.devices
        need(self.target_reports >= 1, f"--target-reports must be >= 1 (got {self.target_reports})")
        need(
            self.target_reports <= self.devices,
            f"--target-reports ({self.target_reports}) cannot exceed --devices ({self.devices})",
        )
        if self.min_reports is None:
            self.min_reports = max(1, math.ceil(self.target_reports / 2))
        need(self.min_reports >= 1, f"--min-reports must be >= 1 (got {self.min_reports})")
        need(
            self.min_reports <= self.target_reports,
            f"--min-reports ({self.min_reports}) cannot exceed --target-reports ({self.target_reports})",
        )
        need(self.over_selection >= 1.0, f"--over-selection must be >= 1 (got {self.over_selection})")
        need(self.round_timeout_s > 0, f"--round-timeout-s must be > 0 (got {self.round_timeout_s})")
        need(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1) (got {self.dropout})")
        need(self.seed >= 0, f"--seed must be >= 0 (got {self.seed})")
        self.faults().validate()
        if self.kill_server_at is not None:
            kill = self.kill_at()
            assert kill is not None
            need(
                kill.round <= self.rounds,
                f"--kill-server-at round {kill.round} is after the last round ({self.rounds})",
            )
            need(
                self.server is None,
                "--kill-server-at needs the server the simulator starts; not with --server",
            )
        need(
            self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})"
        )
        need(self.ray_address is None or self.backend == "ray", "--ray-address needs --backend ray")
        need(
            self.backend != "ray" or ray_available(),
            "--backend ray needs Ray: pip install 'facefl[ray]'",
        )
        need(
            self.server is None or self.db is None,
            "--db applies to the server the simulator starts; not with --server",
        )
        if self.server is not None:
            need(
                self.server.startswith(("http://", "https://")),
                f"--server must be an http(s) URL (got {self.server!r})",
            )
        if self.initial_model is not None:
            need(
                Path(self.initial_model).is_file(),
                f"--initial-model must be a file (got {self.initial_model!r})",
            )
        if self.eval_set is not None and self.server is None:
            need(
                Path(self.eval_set).is_dir(),
                f"--eval-set must be an existing directory (got {self.eval_set!r})",
            )
        if self.trainable is not None:
            try:
                resolve_trainable(self.model, self.trainable)
            except ValueError as exc:
                raise ValueError(f"--trainable: {exc}") from None
        if self.gate is not None:
            need(self.eval_set is not None, "--gate needs --eval-set (the gate compares versions on it)")
            parse_gate(self.gate)
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"admin_token": None, "enrollment_secret": None}  # never write secrets

    def faults(self) -> FaultConfig:
        return FaultConfig(self.dropout, self.stragglers, self.slow_factor, self.corrupt, self.seed)

    def kill_at(self) -> KillAt | None:
        return None if self.kill_server_at is None else parse_kill_at(self.kill_server_at)

    @property
    def faults_enabled(self) -> bool:
        return self.faults().enabled or self.kill_server_at is not None


@dataclass
class RoundResult:
    round: int
    round_id: int
    status: str
    reports: int
    assigned: int
    dropped: int
    model_version: int  # the round's result (the base when it was abandoned)
    wall_s: float
    mb_uploaded: float
    heldout_accuracy: float
    generic: dict[str, float] | None = None  # server-side evaluation of the version (--eval-set)
    train_loss: float | None = None
    jobs: dict[str, int] = field(default_factory=dict)  # job outcome -> count
    job_seconds: dict[str, float] = field(default_factory=dict)  # mean seconds per phase of a job
    # simulated faults: devices that vanished after check-in (planned dropouts that got an assignment),
    # stragglers and those of them refused as late (410), corrupt uploads and how many were refused (4xx)
    vanished: int = 0
    stragglers: int = 0
    late: int = 0
    corrupted: int = 0
    refused: int = 0
    server_kills: int = 0
    # for overhead accounting: each job's pure local-training seconds, and when the last job finished
    # (seconds from the round's start; wall_s - jobs_done_s is the wait for the round to close)
    device_train_s: list[float] = field(default_factory=list)
    jobs_done_s: float = 0.0
    # what devices get after the round: model_version, or the previous served version when the task's
    # release gate held model_version back (None: abandoned)
    served_version: int | None = None


@dataclass
class SimulationResult:
    config: SimulationConfig
    rounds: list[RoundResult]
    initial_heldout_accuracy: float
    total_wall_s: float
    task_id: int = 0
    chance_accuracy: float = 0.0
    initial_generic: dict[str, float] | None = None
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "task_id": self.task_id,
            "initial_heldout_accuracy": self.initial_heldout_accuracy,
            "chance_accuracy": self.chance_accuracy,
            "initial_generic": self.initial_generic,
            "total_wall_s": self.total_wall_s,
            "rounds": [asdict(r) for r in self.rounds],
            "errors": self.errors,
        }

    def table(self) -> str:
        generic = self.initial_generic is not None
        faults = self.config.faults_enabled
        header = (
            f"{'round':>5}  {'status':<10} {'reports':>7} {'dropped':>7} {'wall s':>7} {'MB up':>7} "
            f"{'served':>6} {'heldout acc':>11}"
            + (f" {'generic acc':>11} {'TAR@1e-2':>8}" if generic else "")
        )
        if faults:
            header += f" {'selected':>8} {'vanished':>8} {'late/slow':>9} {'refused/bad':>11} {'kills':>5}"
        lines = [
            f"initial held-out rank-1 accuracy: {self.initial_heldout_accuracy:.3f} "
            f"(chance {self.chance_accuracy:.3f})"
            + (
                f"; generic verification accuracy {_fmt(self.initial_generic, 'accuracy')}" if generic else ""
            ),
            header,
            "-" * len(header),
        ]
        for r in self.rounds:
            lines.append(
                f"{r.round:>5}  {r.status:<10} {r.reports:>7} {r.dropped:>7} {r.wall_s:>7.1f} "
                f"{r.mb_uploaded:>7.2f} {_served_cell(r):>6} {r.heldout_accuracy:>11.3f}"
                + (
                    f" {_fmt(r.generic, 'accuracy'):>11} {_fmt(r.generic, 'tar@far=1e-2'):>8}"
                    if generic
                    else ""
                )
                + (_fault_cells(r) if faults else "")
            )
        if any(r.served_version not in (None, r.model_version) for r in self.rounds):
            lines.append(
                "served: the version devices get after the round; *: the round's version (whose accuracy the "
                "row shows) was held back by the release gate"
            )
        if faults:
            lines.append(
                "selected: assignments handed out; vanished: dropouts after check-in; late/slow: stragglers "
                "refused with 410 / all stragglers; refused/bad: corrupt uploads refused with 4xx / all "
                "corrupt uploads; an abandoned round is reopened on the same base model"
            )
        lines.append(f"total wall time: {self.total_wall_s:.1f} s")
        return "\n".join(lines)


def _served_cell(r: RoundResult) -> str:
    if r.served_version is None:
        return "-"
    return f"v{r.served_version}" + ("*" if r.served_version != r.model_version else "")


def parse_gate(text: str) -> dict[str, Any]:
    """``--gate METRIC:MAX_DROP`` -> the task policy's gate (the server validates the metric)."""
    metric, sep, raw = text.rpartition(":")
    try:
        max_drop = float(raw)
    except ValueError:
        max_drop = math.nan
    if not sep or not metric or not 0.0 <= max_drop <= 1.0:
        raise ValueError(
            f"--gate expects METRIC:MAX_DROP with MAX_DROP in [0, 1], e.g. auc:0.003 (got {text!r})"
        )
    return {"metric": metric, "max_drop": max_drop}


def _fault_cells(r: RoundResult) -> str:
    return (
        f" {r.assigned:>8} {r.vanished:>8} {f'{r.late}/{r.stragglers}':>9} "
        f"{f'{r.refused}/{r.corrupted}':>11} {r.server_kills:>5}"
    )


def _fmt(report: dict[str, float] | None, key: str) -> str:
    return f"{report[key]:.3f}" if report and key in report else "-"


# ------------------------------------------------------------------------------------------ data plan


@dataclass(frozen=True)
class _DataPlan:
    device_specs: list[DataSpec]
    heldout: LocalDataset


def _plan_data(cfg: SimulationConfig, image_size: int) -> _DataPlan:
    """Which identities each device holds (disjoint), and the held-out identities (disjoint from all)."""
    n, k = cfg.devices, cfg.ids_per_device
    if cfg.data == "synthetic":
        id_parts = partition_identities(list(range(n * k)), n, k, cfg.seed)
        specs = [DataSpec("synthetic", tuple(p), image_size, cfg.images_per_id, cfg.seed) for p in id_parts]
        heldout_ids = list(range(HELDOUT_OFFSET, HELDOUT_OFFSET + cfg.heldout_ids))
        heldout = LocalDataset.synthetic(heldout_ids, cfg.images_per_id or 10, image_size, cfg.seed)
        return _DataPlan(specs, heldout)

    root = Path(cfg.data)
    folder = ImageFolder(root)  # DataError (a ValueError) when the layout is wrong
    device_plan = plan_devices(
        folder,
        n,
        k,
        cfg.heldout_ids,
        cfg.seed,
        cfg.images_per_id,
        min_device_images=1 if cfg.skip_small_devices else 2,
    )
    parts = device_plan.devices
    if cfg.skip_small_devices:
        counts = Counter(label for _, label in folder.samples)
        usable = {name: counts[i] for i, name in enumerate(folder.identities)}

        def train_images(name: str) -> int:
            n_img = min(usable[name], cfg.images_per_id) if cfg.images_per_id else usable[name]
            return n_img - held_out_count(n_img, cfg.test_fraction)  # as facefl.data.protocol.device_split

        parts = [part for part in parts if sum(train_images(name) for name in part) >= 2]
    specs = [
        DataSpec(
            "folder",
            tuple(part),
            image_size,
            cfg.images_per_id,
            cfg.seed,
            str(root.resolve()),
            cfg.test_fraction,
        )
        for part in parts
    ]
    heldout = LocalDataset.from_folder(
        root, image_size, identities=device_plan.heldout, max_images_per_identity=cfg.images_per_id
    )
    return _DataPlan(specs, heldout)


# ------------------------------------------------------------------------------------------ admin API


class _Admin:
    """The few admin calls the simulator makes (task creation); reads go through FederatedClient."""

    def __init__(self, base_url: str, token: str) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=60.0
        )

    def create_task(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._http.post("/v1/tasks", json=body)
        except httpx.TransportError as exc:
            raise SimulationError(f"cannot reach the server at {self._http.base_url}: {exc}") from exc
        if resp.status_code != 201:
            raise SimulationError(f"creating the task failed: {resp.status_code} {resp.text[:500]}")
        data: dict[str, Any] = resp.json()
        return data

    def import_model(self, path: Path) -> int:
        """Upload weights as a root model version (POST /v1/models); returns its version."""
        resp = self._http.post("/v1/models", content=path.read_bytes())
        if resp.status_code != 201:
            raise SimulationError(f"importing {path} failed: {resp.status_code} {resp.text[:500]}")
        return int(resp.json()["version"])

    def wait_for_eval(self, version: int, timeout_s: float) -> dict[str, float] | None:
        """The server's evaluation of a model version (computed after it is created), or None on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            resp = self._http.get(f"/v1/models/{version}/info")
            resp.raise_for_status()
            report = resp.json()["metrics"].get("eval")
            if report is not None:
                return {k: v for k, v in report.items() if isinstance(v, int | float)}
            time.sleep(0.2)
        return None

    def close(self) -> None:
        self._http.close()


# ------------------------------------------------------------------------------------------- simulate


def simulate(config: SimulationConfig, *, log: Callable[[str], None] | None = None) -> SimulationResult:
    """Run the simulation described by ``config`` against a real server; see the module docstring."""
    cfg = config.validate()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    arch = ARCHITECTURES[cfg.model]
    admin_token = cfg.admin_token or os.environ.get("FACEFL_ADMIN_TOKEN") or "dev-admin-token"
    secret = cfg.enrollment_secret or os.environ.get("FACEFL_ENROLLMENT_SECRET") or "dev-enrollment-secret"
    plan = _plan_data(cfg, arch.image_size)  # before anything is created: bad data fails fast
    if len(plan.device_specs) < cfg.devices:
        left_out = cfg.devices - len(plan.device_specs)
        kept = len(plan.device_specs)
        if kept == 0:
            raise ValueError("no device holds two training images; lower --test-fraction or add images")
        say(f"left out {left_out} device(s) with fewer than two training images; {kept} devices take part")
        cfg = replace(
            cfg,
            devices=kept,
            target_reports=min(cfg.target_reports or kept, kept),
            min_reports=min(cfg.min_reports or 1, kept),
        )
    chance = 1.0 / plan.heldout.num_identities

    with contextlib.ExitStack() as stack:
        if cfg.work_dir:  # kept: server DB and log, blobs, device credentials and local heads
            run_dir = Path(cfg.work_dir) / f"run-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
            run_dir.mkdir(parents=True, exist_ok=False)
        else:  # removed at the end (registered first, so it runs after the server has stopped)
            run_dir = Path(tempfile.mkdtemp(prefix="facefl-sim-"))
            stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        # worker processes first: they import torch while the server starts
        workers = min(cfg.workers or 1, cfg.devices)
        backend = make_backend(cfg.backend, workers, cfg.ray_address)
        stack.callback(backend.close)
        server: LocalServer | None = None
        if cfg.server is None:
            eval_env = {}
            if cfg.eval_set is not None:
                eval_env["FACEFL_EVAL_SETS"] = json.dumps({"generic": str(Path(cfg.eval_set).resolve())})
            if cfg.public_set is not None:
                eval_env["FACEFL_PUBLIC_SETS"] = json.dumps({"public": str(Path(cfg.public_set).resolve())})
            server = LocalServer(
                run_dir / "server",
                database_url=cfg.db,
                admin_token=admin_token,
                enrollment_secret=secret,
                min_retry_after_s=0.2,
                extra_env=eval_env,
            )
            say(f"starting server (log: {server.log_path})")
            stack.enter_context(server)
            base_url = server.base_url
        else:
            base_url = cfg.server.rstrip("/")
        say(f"server {base_url}; work dir {run_dir}")

        admin = _Admin(base_url, admin_token)
        stack.callback(admin.close)
        eval_name = None if cfg.eval_set is None else ("generic" if cfg.server is None else cfg.eval_set)
        body = _task_body(cfg) | {"eval_set": eval_name}
        if cfg.initial_model is not None:
            body["initial_version"] = admin.import_model(Path(cfg.initial_model))
        task = admin.create_task(body)
        task_id = int(task["id"])

        kill = cfg.kill_at()
        # a server being killed and restarted: the simulator's own reads retry for a while
        reader = FederatedClient(
            base_url, token=admin_token, timeout=60.0, max_retries=12 if kill else 3, backoff_cap_s=2.0
        )
        stack.callback(reader.close)

        device_dirs = _register_devices(base_url, secret, run_dir, plan.device_specs)

        trainer = Trainer(num_threads=1)  # evaluation: small batches, one thread is fastest
        accuracy_cache: dict[int, float] = {}

        def accuracy(version: int) -> float:
            if version not in accuracy_cache:
                weights = reader.download_model(version)
                emb = trainer.embed(weights, plan.heldout.images, architecture=cfg.model)
                accuracy_cache[version] = rank1_identification(emb, plan.heldout.labels)
            return accuracy_cache[version]

        initial_version = int(task["current_version"])
        initial_acc = accuracy(initial_version)
        result = SimulationResult(
            config=cfg,
            rounds=[],
            initial_heldout_accuracy=initial_acc,
            total_wall_s=0.0,
            task_id=task_id,
            chance_accuracy=chance,
            initial_generic=admin.wait_for_eval(initial_version, EVAL_TIMEOUT_S) if eval_name else None,
        )

        bar = tqdm(
            total=cfg.rounds * cfg.devices,
            desc="simulate",
            unit="device",
            disable=not cfg.progress,
            file=sys.stderr,
        )
        stack.callback(bar.close)
        faults = cfg.faults()
        seen_rounds: set[int] = set()

        for r in range(1, cfg.rounds + 1):
            round_started = time.perf_counter()
            open_round = _wait_for_open_round(
                reader, task_id, seen_rounds, timeout_s=cfg.round_timeout_s + 60
            )
            if open_round is None:
                result.errors.append(f"round {r}: the task has no open round (completed?)")
                break
            seen_rounds.add(open_round.id)
            bar.set_postfix_str(f"round {r}/{cfg.rounds}")
            jobs = [
                DeviceJob(
                    base_url=base_url,
                    task_id=task_id,
                    device_index=i,
                    device_dir=str(device_dirs[i]),
                    data=plan.device_specs[i],
                    expected_round_id=open_round.id,
                    seed=cfg.seed * 1_000_003 + r * 10_007 + i,
                    assignment_timeout_s=min(60.0, cfg.round_timeout_s),
                    fault=faults.decide(r, i),
                    outage_tolerance_s=min(120.0, cfg.round_timeout_s) if kill else 0.0,
                )
                for i in range(cfg.devices)
            ]
            killer = None
            if kill is not None and kill.round == r and server is not None:
                killer = _ServerKiller(server, kill.seconds, say)
            job_results: list[JobResult] = []
            for job_result in backend.map_unordered(run_device_job, jobs):
                job_results.append(job_result)
                bar.update(1)
            jobs_done_s = round(time.perf_counter() - round_started, 3)
            if killer is not None:
                killer.join()
            job_results.sort(key=lambda jr: jr.device_index)
            for jr in job_results:
                expected = (
                    jr.fault == "straggler" and jr.status == ROUND_CLOSED
                ) or jr.status == CORRUPT_REFUSED
                if jr.status not in (UPLOADED, DROPPED, NOT_SELECTED) and not expected:
                    result.errors.append(f"round {r} device {jr.device_index}: {jr.status}: {jr.error}")
            if all(jr.status == FAILED for jr in job_results):
                raise SimulationError(f"round {r}: every device failed; first error: {job_results[0].error}")
            closed = _wait_until_closed(reader, open_round.id, timeout_s=cfg.round_timeout_s + 60)
            wall_s = round(time.perf_counter() - round_started, 3)
            version = (
                closed.result_version if closed.status == "aggregated" and closed.result_version else None
            )
            model_version = version if version is not None else closed.base_version
            losses = [jr.metrics["train_loss"] for jr in job_results if "train_loss" in jr.metrics]
            result.rounds.append(
                RoundResult(
                    round=r,
                    round_id=closed.id,
                    status=closed.status,
                    reports=closed.reported,
                    assigned=closed.assigned,
                    dropped=closed.assigned - closed.reported,
                    model_version=model_version,
                    wall_s=wall_s,
                    mb_uploaded=round(sum(jr.bytes_sent for jr in job_results) / 1e6, 4),
                    heldout_accuracy=accuracy(model_version),
                    generic=admin.wait_for_eval(model_version, EVAL_TIMEOUT_S) if eval_name else None,
                    train_loss=float(np.mean(losses)) if losses else None,
                    jobs=dict(Counter(jr.status for jr in job_results)),
                    job_seconds=_mean_phases(job_results),
                    **_fault_counts(job_results),
                    server_kills=int(killer is not None and killer.killed),
                    device_train_s=[round(jr.train_seconds, 4) for jr in job_results if jr.train_seconds > 0],
                    jobs_done_s=jobs_done_s,
                    served_version=closed.served_version if version is not None else None,
                )
            )
        bar.close()
        backend.close()

    result.total_wall_s = round(time.perf_counter() - started, 3)
    if cfg.json_path:
        path = Path(cfg.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    return result


class _ServerKiller:
    """SIGKILL the started server ``seconds`` from now, then restart it on the same port, database and
    blob store (a thread; ``join()`` waits until the server is back)."""

    def __init__(self, server: LocalServer, seconds: float, say: Callable[[str], None]) -> None:
        self.server, self.seconds, self.say = server, seconds, say
        self.killed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="facefl-server-killer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        time.sleep(self.seconds)
        try:
            self.say(f"killing the server (SIGKILL, pid {self.server.pid})")
            self.server.kill()
            self.killed = True
            started = time.perf_counter()
            self.server.restart()
            self.say(f"server restarted in {time.perf_counter() - started:.1f} s (pid {self.server.pid})")
        except BaseException as exc:  # reported by join() in the main thread
            self.error = exc

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise SimulationError(f"restarting the killed server failed: {self.error}") from self.error


def _fault_counts(results: Sequence[JobResult]) -> dict[str, int]:
    stragglers = [jr for jr in results if jr.fault == "straggler" and jr.status != NOT_SELECTED]
    corrupted = [jr for jr in results if jr.status in (CORRUPT_REFUSED, CORRUPT_ACCEPTED)]
    return {
        "vanished": sum(1 for jr in results if jr.fault == "dropout" and jr.status == DROPPED),
        "stragglers": len(stragglers),
        "late": sum(1 for jr in stragglers if jr.status == ROUND_CLOSED),
        "corrupted": len(corrupted),
        "refused": sum(1 for jr in corrupted if jr.status == CORRUPT_REFUSED),
    }


_HYPERPARAM = re.compile(r"hyperparams[.](\w+)")


def _option(match: re.Match[str]) -> str:
    """``hyperparams.public_set`` -> ``--public-set``: the simulator's option of a hyper-parameter."""
    return "--" + match.group(1).replace("_", "-")


def _mean_phases(results: Sequence[JobResult]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for jr in results:
        for name, seconds in {**jr.phases, "total": jr.seconds}.items():
            totals.setdefault(name, []).append(seconds)
    return {name: round(float(np.mean(v)), 4) for name, v in totals.items()}


def _task_body(cfg: SimulationConfig) -> dict[str, Any]:
    return {
        "name": f"simulate-{datetime.now():%Y%m%d-%H%M%S}",
        "algorithm": cfg.algorithm,
        "architecture": cfg.model,
        "embedding_dim": None,
        "seed": cfg.seed,
        "rounds": cfg.rounds,
        "trainable": cfg.trainable,
        # the server the simulator starts names its public set "public"; an external one's is --public-set
        "hyperparams": cfg.hyperparams("public" if cfg.server is None else cfg.public_set),
        "policy": {
            "target_reports": cfg.target_reports,
            "over_selection": cfg.over_selection,
            "min_reports": cfg.min_reports,
            "round_timeout_s": cfg.round_timeout_s,
            "gate": parse_gate(cfg.gate) if cfg.gate is not None else None,
        },
    }


def _register_devices(base_url: str, secret: str, run_dir: Path, specs: Sequence[DataSpec]) -> list[Path]:
    """Enroll every simulated device; credentials go to ``run_dir/devices/<i>/credentials.json``."""
    dirs: list[Path] = []
    for i, _spec in enumerate(specs):
        device_dir = run_dir / "devices" / str(i)
        with FederatedClient(base_url, timeout=30.0) as client:
            creds: DeviceCredentials = client.register(secret, name=f"sim-device-{i}")
        creds.save(device_dir / "credentials.json")
        dirs.append(device_dir)
    return dirs


def _wait_for_open_round(
    reader: FederatedClient, task_id: int, seen: set[int], *, timeout_s: float
) -> RoundInfo | None:
    """The task's open round that has not been simulated yet; None when the task has completed."""
    deadline = time.monotonic() + timeout_s
    while True:
        task = reader.get_task(task_id)
        current = task.current_round
        if current is not None and current.status == "open" and current.id not in seen:
            return current
        if task.status != "running":
            return None
        if time.monotonic() > deadline:
            raise SimulationError(f"task {task_id}: no new open round within {timeout_s:g} s")
        time.sleep(0.1)


def _wait_until_closed(reader: FederatedClient, round_id: int, *, timeout_s: float) -> RoundInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        info = reader.get_round(round_id)
        if info.closed:
            return info
        if time.monotonic() > deadline:
            raise SimulationError(f"round {round_id} still {info.status} after {timeout_s:g} s")
        time.sleep(0.1)
