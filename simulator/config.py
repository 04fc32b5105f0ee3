"""What a simulation run depends on: :class:`SimulationConfig`, its checks, and the task it creates."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facefl.algorithms import registry
from facefl.compression import DEFAULT_ENCODING, ENCODINGS
from facefl.models import ARCHITECTURES, resolve_trainable

from .backends import BACKENDS, ray_available
from .faults import FaultConfig, KillAt, parse_kill_at

__all__ = ["SECAGG_CLIP_NORM", "SECAGG_STAGE_TIMEOUT_S", "SimulationConfig", "SimulationError", "parse_gate"]

# the L2 norm a device clips its delta to under --secure-aggregation: well above a delta of one local
# epoch at the default learning rate (the server cannot check norms under secure aggregation)
SECAGG_CLIP_NORM = 10.0
# how long each stage after the key advertisement waits: a device that vanished holds its stage this long
SECAGG_STAGE_TIMEOUT_S = 30.0


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
    # with an image folder: identity folders left out of the plan (facefl.data.protocol.plan_devices)
    exclude_identities: tuple[str, ...] = ()
    server: str | None = None
    db: str | None = None
    admin_token: str | None = None
    enrollment_secret: str | None = None
    json_path: str | None = None
    workers: int | None = None  # default: CPU count
    # device jobs each worker process runs at once, in threads (their HTTP waits overlap; their trainings
    # take turns): many light devices (the tiny model) per process
    device_threads: int = 1
    # worker processes per training slot (local backend): with 2, two processes share each of the
    # ``workers`` slots, so one checks in, downloads or uploads while the other trains
    overlap: int = 1
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
    # how devices encode their uploads (the task's policy.update_encoding, facefl.compression), and
    # whether they carry what the encoding dropped over to their next delta (policy.update_error_feedback)
    update_encoding: str = "float32"
    update_error_feedback: bool = False
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
    # differential privacy (the task's policy.dp, DP-FedAvg): on with dp_clip_norm; the population the
    # accountant assumes defaults to the simulated devices (q = target_reports / population)
    dp_clip_norm: float | None = None
    dp_noise_multiplier: float | None = None  # default 1.0 with dp_clip_norm
    dp_population: int | None = None
    dp_delta: float | None = None  # default 1e-5 with dp_clip_norm
    dp_epsilon_budget: float | None = None
    # secure aggregation (the task's policy.secure_aggregation, docs/privacy.md): devices clip their delta
    # to secagg_clip_norm and the server sees only the cohort's masked sum; every stage after the key
    # advertisement waits at most secagg_stage_timeout_s for the devices expected in it
    secure_aggregation: bool = False
    secagg_clip_norm: float | None = None  # default SECAGG_CLIP_NORM with secure_aggregation
    secagg_stage_timeout_s: float | None = None  # default SECAGG_STAGE_TIMEOUT_S with secure_aggregation

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
        need(
            not self.exclude_identities or self.data != "synthetic",
            "--exclude-identities needs --data DIR (an image folder)",
        )
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
        workers_given = self.workers is not None
        if self.workers is None:
            self.workers = os.cpu_count() or 1
        need(self.workers >= 1, f"--workers must be >= 1 (got {self.workers})")
        need(self.device_threads >= 1, f"--device-threads must be >= 1 (got {self.device_threads})")
        need(self.overlap >= 1, f"--overlap must be >= 1 (got {self.overlap})")
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
            # secure aggregation needs two reports at least (the sum of one update is that update)
            least = 2 if self.secure_aggregation else 1
            self.min_reports = min(self.target_reports, max(least, math.ceil(self.target_reports / 2)))
        need(self.min_reports >= 1, f"--min-reports must be >= 1 (got {self.min_reports})")
        need(
            self.min_reports <= self.target_reports,
            f"--min-reports ({self.min_reports}) cannot exceed --target-reports ({self.target_reports})",
        )
        need(self.over_selection >= 1.0, f"--over-selection must be >= 1 (got {self.over_selection})")
        need(self.round_timeout_s > 0, f"--round-timeout-s must be > 0 (got {self.round_timeout_s})")
        need(
            self.update_encoding in ENCODINGS,
            f"--update-encoding must be one of {', '.join(ENCODINGS)} (got {self.update_encoding!r})",
        )
        need(
            not self.update_error_feedback or self.update_encoding != DEFAULT_ENCODING,
            f"--update-error-feedback needs a lossy --update-encoding (not {DEFAULT_ENCODING})",
        )
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
        need(self.overlap == 1 or self.backend == "local", "--overlap applies to --backend local only")
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
        self._validate_dp(need, algorithm.updates_only_summed)
        self._validate_secagg(need, algorithm.updates_only_summed, workers_given)
        return self

    def _validate_secagg(
        self, need: Callable[[bool, str], None], updates_only_summed: bool, workers_given: bool
    ) -> None:
        if not self.secure_aggregation:
            given = [
                name
                for name, value in (
                    ("--secagg-clip-norm", self.secagg_clip_norm),
                    ("--secagg-stage-timeout", self.secagg_stage_timeout_s),
                )
                if value is not None
            ]
            need(not given, f"{', '.join(given)} needs --secure-aggregation")
            return
        need(
            updates_only_summed,
            f"--secure-aggregation: {self.algorithm}'s server reads each update on its own, "
            "secure aggregation hides them",
        )
        assert self.min_reports is not None and self.target_reports is not None and self.workers is not None
        need(
            self.min_reports >= 2,
            f"--secure-aggregation needs --min-reports >= 2 (got {self.min_reports}; --target-reports "
            f"{self.target_reports}): a sum of one update is that update",
        )
        need(
            self.update_encoding == DEFAULT_ENCODING and not self.update_error_feedback,
            f"--secure-aggregation quantizes updates for the protocol itself: --update-encoding must be "
            f"{DEFAULT_ENCODING} and --update-error-feedback off",
        )
        need(
            self.corrupt == 0,
            "--corrupt: the server cannot see values under --secure-aggregation (a masked update is any "
            "32-bit integers), so corrupt uploads are not simulated",
        )
        # every device of a round's cohort waits for the others in each stage: they must run at once
        if not workers_given:
            self.workers = max(self.workers, self.devices)
        need(
            self.workers >= self.target_reports,
            f"--secure-aggregation runs a round's devices at once: --workers ({self.workers}) must be "
            f">= --target-reports ({self.target_reports})",
        )
        if self.secagg_clip_norm is None:
            self.secagg_clip_norm = SECAGG_CLIP_NORM
        if self.secagg_stage_timeout_s is None:
            self.secagg_stage_timeout_s = SECAGG_STAGE_TIMEOUT_S

    def secagg_policy(self) -> dict[str, Any] | None:
        """The task's policy.secure_aggregation (None: off); call after validate()."""
        if not self.secure_aggregation:
            return None
        return {"clip_norm": self.secagg_clip_norm, "stage_timeout_s": self.secagg_stage_timeout_s}

    def round_wait_s(self) -> float:
        """The longest a round can stay open: its deadline, plus the stages of secure aggregation."""
        stages = 3 * (self.secagg_stage_timeout_s or 0.0) if self.secure_aggregation else 0.0
        return self.round_timeout_s + stages

    def _validate_dp(self, need: Callable[[bool, str], None], updates_only_summed: bool) -> None:
        others = {
            "--dp-noise-multiplier": self.dp_noise_multiplier,
            "--dp-population": self.dp_population,
            "--dp-delta": self.dp_delta,
            "--dp-epsilon-budget": self.dp_epsilon_budget,
        }
        if self.dp_clip_norm is None:
            given = [name for name, value in others.items() if value is not None]
            need(not given, f"{', '.join(given)} needs --dp-clip-norm (differential privacy is off)")
            return
        need(updates_only_summed, f"--dp-clip-norm: {self.algorithm} uploads per-device tensors (no DP)")
        if self.dp_noise_multiplier is None:
            self.dp_noise_multiplier = 1.0
        if self.dp_delta is None:
            self.dp_delta = 1e-5
        if self.dp_population is None:
            self.dp_population = self.devices
        assert self.target_reports is not None
        need(
            self.dp_population >= self.target_reports,
            f"--dp-population ({self.dp_population}) cannot be below "
            f"--target-reports ({self.target_reports})",
        )
        need(0 < self.dp_delta < 0.1, f"--dp-delta must be in (0, 0.1) (got {self.dp_delta})")
        need(
            self.dp_epsilon_budget is None or self.dp_noise_multiplier > 0,
            "--dp-epsilon-budget needs --dp-noise-multiplier > 0 (without noise epsilon is infinite)",
        )

    def dp_policy(self) -> dict[str, Any] | None:
        """The task's policy.dp (None: off); call after validate()."""
        if self.dp_clip_norm is None:
            return None
        return {
            "clip_norm": self.dp_clip_norm,
            "noise_multiplier": self.dp_noise_multiplier,
            "delta": self.dp_delta,
            "population": self.dp_population,
            "epsilon_budget": self.dp_epsilon_budget,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"admin_token": None, "enrollment_secret": None}  # never write secrets

    def faults(self) -> FaultConfig:
        return FaultConfig(self.dropout, self.stragglers, self.slow_factor, self.corrupt, self.seed)

    def kill_at(self) -> KillAt | None:
        return None if self.kill_server_at is None else parse_kill_at(self.kill_server_at)

    @property
    def faults_enabled(self) -> bool:
        return self.faults().enabled or self.kill_server_at is not None


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


_HYPERPARAM = re.compile(r"hyperparams[.](\w+)")


def _option(match: re.Match[str]) -> str:
    """``hyperparams.public_set`` -> ``--public-set``: the simulator's option of a hyper-parameter."""
    return "--" + match.group(1).replace("_", "-")
