"""What a simulation run reports: per-round results, the whole run's, its table and its JSON."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import SimulationConfig
from .worker import CORRUPT_ACCEPTED, CORRUPT_REFUSED, DROPPED, NOT_SELECTED, ROUND_CLOSED, JobResult

__all__ = [
    "SECAGG_STEPS",
    "RoundResult",
    "SimulationResult",
    "fault_counts",
    "job_outcomes",
    "mean_phases",
    "peak_trainings",
    "secagg_counts",
]

# the requests of secure aggregation a device makes (device_sdk's step names) and their short names
SECAGG_STEPS = {
    "secagg_keys": "keys",
    "secagg_shares": "shares",
    "secagg_upload": "masked",
    "secagg_reveal": "reveal",
}


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
    # the most device trainings that ran at the same time (at most --workers, also with --overlap)
    peak_trainings: int = 0
    # what devices get after the round: model_version, or the previous served version when the task's
    # release gate held model_version back (None: abandoned)
    served_version: int | None = None
    # differential privacy (policy.dp): (epsilon, delta) spent once this round aggregated; epsilon None
    # with delta set: no finite guarantee (no noise). Both None: DP off, or the round was abandoned
    epsilon: float | None = None
    delta: float | None = None
    # secure aggregation: how many devices got each of their requests accepted (keys, shares, masked,
    # reveal); a device that vanished after sharing counts in shares but not in masked. None: off
    secagg: dict[str, int] | None = None
    abandoned_reason: str | None = None  # the server's, when the round was abandoned


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
    # why the task stopped before --rounds rounds, e.g. "privacy_budget_exhausted"; None: it did not
    stopped: str | None = None

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
            "stopped": self.stopped,
        }

    def table(self) -> str:
        generic = self.initial_generic is not None
        faults = self.config.faults_enabled
        private = self.config.dp_clip_norm is not None
        secure = self.config.secure_aggregation
        header = (
            f"{'round':>5}  {'status':<10} {'reports':>7} {'dropped':>7} {'wall s':>7} {'MB up':>7} "
            f"{'served':>6} {'heldout acc':>11}"
            + (f" {'generic acc':>11} {'TAR@1e-2':>8}" if generic else "")
            + (f" {'epsilon':>8}" if private else "")
            + (f" {'keys/shares/masked/reveal':>25}" if secure else "")
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
                + (f" {_epsilon_cell(r):>8}" if private else "")
                + (f" {_secagg_cell(r):>25}" if secure else "")
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
        if private:
            lines.append(
                f"epsilon: spent after the round, at delta {self.config.dp_delta:g} "
                "(inf: no noise, no finite guarantee)"
            )
        if secure:
            lines.append(
                "keys/shares/masked/reveal: devices whose secure-aggregation request of that stage the "
                "server accepted (masked: their masked update; MB up counts every stage's requests)"
            )
        for r in self.rounds:
            if r.abandoned_reason:
                lines.append(f"round {r.round} abandoned: {r.abandoned_reason}")
        if self.stopped is not None:
            lines.append(f"the task stopped after {len(self.rounds)} round(s): {self.stopped}")
        lines.append(f"total wall time: {self.total_wall_s:.1f} s")
        return "\n".join(lines)


def _served_cell(r: RoundResult) -> str:
    if r.served_version is None:
        return "-"
    return f"v{r.served_version}" + ("*" if r.served_version != r.model_version else "")


def _epsilon_cell(r: RoundResult) -> str:
    if r.delta is None:  # abandoned: nothing released
        return "-"
    return "inf" if r.epsilon is None else f"{r.epsilon:.3g}"


def _secagg_cell(r: RoundResult) -> str:
    counts = r.secagg or {}
    return "/".join(str(counts.get(short, 0)) for short in SECAGG_STEPS.values())


def _fault_cells(r: RoundResult) -> str:
    return (
        f" {r.assigned:>8} {r.vanished:>8} {f'{r.late}/{r.stragglers}':>9} "
        f"{f'{r.refused}/{r.corrupted}':>11} {r.server_kills:>5}"
    )


def _fmt(report: dict[str, float] | None, key: str) -> str:
    return f"{report[key]:.3f}" if report and key in report else "-"


def fault_counts(results: Sequence[JobResult]) -> dict[str, int]:
    stragglers = [jr for jr in results if jr.fault == "straggler" and jr.status != NOT_SELECTED]
    corrupted = [jr for jr in results if jr.status in (CORRUPT_REFUSED, CORRUPT_ACCEPTED)]
    return {
        "vanished": sum(1 for jr in results if jr.fault == "dropout" and jr.status == DROPPED),
        "stragglers": len(stragglers),
        "late": sum(1 for jr in stragglers if jr.status == ROUND_CLOSED),
        "corrupted": len(corrupted),
        "refused": sum(1 for jr in corrupted if jr.status == CORRUPT_REFUSED),
    }


def secagg_counts(results: Sequence[JobResult]) -> dict[str, int]:
    """Secure aggregation: stage -> devices whose request of that stage was accepted."""
    return {short: sum(step in jr.secagg_steps for jr in results) for step, short in SECAGG_STEPS.items()}


def mean_phases(results: Sequence[JobResult]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for jr in results:
        for name, seconds in {**jr.phases, "total": jr.seconds}.items():
            totals.setdefault(name, []).append(seconds)
    return {name: round(float(np.mean(v)), 4) for name, v in totals.items()}


def peak_trainings(results: Sequence[JobResult]) -> int:
    """The most jobs whose training windows overlap at one instant (a window that ends as another
    begins does not overlap it)."""
    events = []
    for jr in results:
        if jr.train_window is not None:
            began, ended = jr.train_window
            events += [(began, 1), (ended, -1)]
    running = peak = 0
    for _when, step in sorted(events):  # at equal times -1 sorts first: an end before a start
        running += step
        peak = max(peak, running)
    return peak


def job_outcomes(results: Sequence[JobResult]) -> dict[str, int]:
    """Job status -> count."""
    return dict(Counter(jr.status for jr in results))
