"""The typed records of the round protocol (docs/protocol.md): what the server's JSON answers become.

Each record parses its JSON with ``from_json`` and raises :class:`~device_sdk.errors.ProtocolError` when a
field is missing or malformed; records that mirror a server resource keep the whole answer in ``raw``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from facefl import compression

from .errors import ProtocolError

__all__ = [
    "Assignment",
    "DeviceCredentials",
    "ModelVersion",
    "RoundInfo",
    "SecAggInfo",
    "TaskInfo",
    "TransferStats",
    "UploadReceipt",
    "WaitInstruction",
]


@dataclass(frozen=True)
class DeviceCredentials:
    """What registration returns: the device's id and its bearer token (shown once by the server)."""

    device_id: str
    token: str

    def save(self, path: str | Path) -> None:
        """Write the credentials as JSON, readable by the owner only (the token is a secret)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"device_id": self.device_id, "token": self.token}, fh)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> DeviceCredentials:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(device_id=str(data["device_id"]), token=str(data["token"]))


@dataclass(frozen=True)
class SecAggInfo:
    """An assignment's secure-aggregation parameters (docs/protocol.md "Secure aggregation")."""

    clip_norm: float
    max_sample_weight: int
    noise_stddev: float
    max_devices: int
    bound: float
    scale: float
    modulus_bits: int
    max_neighbours: int
    stage_timeout_s: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecAggInfo:
        info = cls(
            clip_norm=float(data["clip_norm"]),
            max_sample_weight=int(data["max_sample_weight"]),
            noise_stddev=float(data["noise_stddev"]),
            max_devices=int(data["max_devices"]),
            bound=float(data["bound"]),
            scale=float(data["scale"]),
            modulus_bits=int(data["modulus_bits"]),
            max_neighbours=int(data["max_neighbours"]),
            stage_timeout_s=float(data["stage_timeout_s"]),
        )
        if info.modulus_bits != 32 or not (info.scale > 0 and info.bound > 0 and info.clip_norm > 0):
            raise ValueError("unsupported secure-aggregation parameters")
        return info


@dataclass(frozen=True)
class Assignment:
    """The server's answer "train": which round, which base model, which hyper-parameters."""

    round_id: int
    task_id: int
    round_number: int
    base_version: int
    algorithm: str
    architecture: str
    embedding_dim: int | None
    image_size: int | None
    hyperparams: dict[str, Any]
    deadline: datetime | None
    upload_token: str
    # partial training: the task's parameter groups and their name prefixes (None: the whole model)
    trainable: tuple[str, ...] | None = None
    trainable_prefixes: tuple[str, ...] | None = None
    # how the delta is encoded for upload, and whether training adds back what encoding dropped
    update_encoding: str = compression.DEFAULT_ENCODING
    update_error_feedback: bool = False
    # present when the task uses secure aggregation: run_round then runs its stages to upload
    secure_aggregation: SecAggInfo | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Assignment:
        try:
            return cls(
                round_id=int(data["round_id"]),
                task_id=int(data["task_id"]),
                round_number=int(data["round_number"]),
                base_version=int(data["base_version"]),
                algorithm=str(data["algorithm"]),
                architecture=str(data["architecture"]),
                embedding_dim=_opt_int(data.get("embedding_dim")),
                image_size=_opt_int(data.get("image_size")),
                hyperparams=dict(data.get("hyperparams") or {}),
                deadline=_parse_time(data.get("deadline")),
                upload_token=str(data["upload_token"]),
                trainable=_opt_strings(data.get("trainable")),
                trainable_prefixes=_opt_strings(data.get("trainable_prefixes")),
                update_encoding=compression.known_or_default(data.get("update_encoding")),
                update_error_feedback=bool(data.get("update_error_feedback", False)),
                secure_aggregation=SecAggInfo.from_json(data["secure_aggregation"])
                if data.get("secure_aggregation")
                else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed assignment: {exc!r}") from exc


@dataclass(frozen=True)
class WaitInstruction:
    """The server's answer "come back later" (pace steering)."""

    retry_after_s: float
    reason: str  # "no_open_round" | "round_full" | "already_participated" | "task_completed" | ...


@dataclass(frozen=True)
class UploadReceipt:
    """The server accepted (202) and durably stored an update."""

    update_id: str
    round_id: int
    reports: int
    bytes_sent: int


@dataclass(frozen=True)
class RoundInfo:
    """``GET /v1/rounds/{id}``; ``raw`` keeps every field the server sent."""

    id: int
    task_id: int
    number: int
    status: str  # "open" | "aggregating" | "aggregated" | "abandoned"
    base_version: int
    result_version: int | None
    target_reports: int
    min_reports: int
    max_assignments: int | None
    assigned: int
    reported: int
    deadline: datetime | None
    metrics: dict[str, Any]
    # what devices get after the round: result_version, or base_version when the release gate held the
    # result back (None until the round aggregated, and from servers without a gate)
    served_version: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def closed(self) -> bool:
        return self.status in ("aggregated", "abandoned")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundInfo:
        try:
            return cls(
                id=int(data["id"]),
                task_id=int(data["task_id"]),
                number=int(data["number"]),
                status=str(data["status"]),
                base_version=int(data["base_version"]),
                result_version=_opt_int(data.get("result_version")),
                target_reports=int(data.get("target_reports") or 0),
                min_reports=int(data.get("min_reports") or 0),
                max_assignments=_opt_int(data.get("max_assignments")),
                assigned=int(data.get("assigned") or 0),
                reported=int(data.get("reported") or 0),
                deadline=_parse_time(data.get("deadline")),
                metrics=dict(data.get("metrics") or {}),
                served_version=_opt_int(data.get("served_version")),
                raw=dict(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed round: {exc!r}") from exc


@dataclass(frozen=True)
class TaskInfo:
    """``GET /v1/tasks/{id}``; ``raw`` keeps every field the server sent."""

    id: int
    name: str
    algorithm: str
    architecture: str
    embedding_dim: int | None
    image_size: int | None
    rounds: int
    hyperparams: dict[str, Any]
    policy: dict[str, Any]
    status: str  # "running" | "paused" | "completed" | "budget_exhausted"
    current_version: int | None
    aggregated_rounds: int
    current_round: RoundInfo | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskInfo:
        try:
            current = data.get("current_round")
            return cls(
                id=int(data["id"]),
                name=str(data.get("name", "")),
                algorithm=str(data["algorithm"]),
                architecture=str(data["architecture"]),
                embedding_dim=_opt_int(data.get("embedding_dim")),
                image_size=_opt_int(data.get("image_size")),
                rounds=int(data.get("rounds") or 0),
                hyperparams=dict(data.get("hyperparams") or {}),
                policy=dict(data.get("policy") or {}),
                status=str(data["status"]),
                current_version=_opt_int(data.get("current_version")),
                aggregated_rounds=int(data.get("aggregated_rounds") or 0),
                current_round=RoundInfo.from_json(current) if current else None,
                raw=dict(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed task: {exc!r}") from exc


@dataclass
class TransferStats:
    """Counters of what this client put on and took off the wire (request/response bodies)."""

    requests: int = 0
    retries: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class ModelVersion:
    """``GET /v1/models/{version}/info``: a model version's lineage, digest and evaluation metrics."""

    version: int
    task_id: int | None
    parent_version: int | None
    round_id: int | None
    architecture: str
    embedding_dim: int | None
    sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    # False: the task's release gate held this version back (recorded, never handed to devices)
    served: bool
    held_back_reason: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def evaluation(self) -> dict[str, float] | None:
        """The server's evaluation of this version on the task's eval set (None until it has run)."""
        report = self.metrics.get("eval")
        if not isinstance(report, Mapping):
            return None
        return {str(k): float(v) for k, v in report.items() if isinstance(v, int | float)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelVersion:
        try:
            return cls(
                version=int(data["version"]),
                task_id=_opt_int(data.get("task_id")),
                parent_version=_opt_int(data.get("parent_version")),
                round_id=_opt_int(data.get("round_id")),
                architecture=str(data["architecture"]),
                embedding_dim=_opt_int(data.get("embedding_dim")),
                sha256=str(data.get("sha256") or ""),
                size_bytes=int(data.get("size_bytes") or 0),
                metrics=dict(data.get("metrics") or {}),
                served=bool(data.get("served", True)),
                held_back_reason=_opt_str(data.get("held_back_reason")),
                raw=dict(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed model version: {exc!r}") from exc


def _parse_time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    return datetime.fromisoformat(str(value))


def _opt_strings(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
