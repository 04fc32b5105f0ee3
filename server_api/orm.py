"""SQLAlchemy 2 ORM models (typed Mapped[...]). The schema changes only through Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


# Round states. "open" and "aggregating" are active; at most one active round per task (partial index).
ROUND_OPEN = "open"
ROUND_AGGREGATING = "aggregating"
ROUND_AGGREGATED = "aggregated"
ROUND_ABANDONED = "abandoned"

# Task states: "running" hands out assignments; "paused" (by the operator) hands out none and opens no
# new round; "completed" after its last round aggregated; "budget_exhausted" when one more round would
# spend more than its policy.dp.epsilon_budget (final, like completed).
TASK_RUNNING = "running"
TASK_PAUSED = "paused"
TASK_BUDGET_EXHAUSTED = "budget_exhausted"


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64))
    capabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None]


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    algorithm: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str] = mapped_column(String(32))
    embedding_dim: Mapped[int]
    image_size: Mapped[int]
    rounds: Mapped[int]
    hyperparams: Mapped[dict[str, Any]]
    policy: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="running")
    eval_set: Mapped[str | None] = mapped_column(String(64))
    # parameter groups that train on devices (None: the whole model)
    trainable: Mapped[list[str] | None] = mapped_column(JSON)
    # the served version (the last that passed the task's release gate); no FK: tasks and
    # model_versions reference each other; the service keeps this consistent
    current_version: Mapped[int | None]
    aggregated_rounds: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), index=True)
    parent_version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))
    # unique: exactly one model version per round, whatever the number of workers
    # (no FK to rounds: rounds.base_version already points here, and a cycle would complicate DDL)
    round_id: Mapped[int | None] = mapped_column(unique=True)
    architecture: Mapped[str] = mapped_column(String(32))
    embedding_dim: Mapped[int | None]
    blob_key: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # blob of server-only algorithm state at this version (FedFace: every device's class embedding);
    # never served whole: each device may read its own row only
    server_state_key: Mapped[str | None] = mapped_column(String(64))
    # False: the task's release gate held this version back (recorded, never served to devices)
    served: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    held_back_reason: Mapped[str | None] = mapped_column(String(256))


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("task_id", "number", name="uq_rounds_task_number"),
        Index(
            "uq_rounds_one_active_per_task",
            "task_id",
            unique=True,
            sqlite_where=text("status IN ('open', 'aggregating')"),
            postgresql_where=text("status IN ('open', 'aggregating')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    number: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default=ROUND_OPEN)
    base_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    result_version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))
    target_reports: Mapped[int]
    min_reports: Mapped[int]
    max_assignments: Mapped[int]
    assigned: Mapped[int] = mapped_column(default=0)
    reported: Mapped[int] = mapped_column(default=0)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    deadline: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    aggregation_started_at: Mapped[datetime | None]  # the lease: fences the aggregation that holds it
    aggregation_heartbeat_at: Mapped[datetime | None]  # renewed while that aggregation is alive
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # what devices get after this round: result_version, or base_version when the gate held it back
    served_version: Mapped[int | None]


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("round_id", "device_id", name="uq_assignments_round_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    upload_token_hash: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    reported: Mapped[bool] = mapped_column(default=False)


class Update(Base):
    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("round_id", "device_id", name="uq_updates_round_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    blob_key: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int]
    num_samples: Mapped[int]
    norm: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# Secure aggregation stages (facefl.secagg): a round with a secagg_rounds row moves through them in
# order; "done" hands it to the aggregation. Round.deadline is the current stage's deadline.
SECAGG_ADVERTISE = "advertise"
SECAGG_SHARE = "share"
SECAGG_UPLOAD = "upload"
SECAGG_UNMASK = "unmask"
SECAGG_DONE = "done"


class SecAggRound(Base):
    """Per-round secure-aggregation state: the stage and what every device needs to quantize and mask."""

    __tablename__ = "secagg_rounds"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), default=SECAGG_ADVERTISE)
    graph_seed: Mapped[int | None]  # chosen when the advertise stage closes
    # fixed point, clip norm, noise, neighbourhood size, stage timeout (schemas.SecAggInfo's fields)
    params: Mapped[dict[str, Any]]


class SecAggMember(Base):
    """A device that advertised its two public keys in a round (the cohort, once the stage closed)."""

    __tablename__ = "secagg_members"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    c_public: Mapped[bytes] = mapped_column(LargeBinary(32))
    s_public: Mapped[bytes] = mapped_column(LargeBinary(32))
    shared: Mapped[bool] = mapped_column(default=False)  # in U2: its shares are delivered, it must upload
    revealed: Mapped[bool] = mapped_column(default=False)


class SecAggShare(Base):
    """An encrypted share, opaque to the server, held for its recipient."""

    __tablename__ = "secagg_shares"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    sender_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    recipient_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)


class SecAggReveal(Base):
    """A share a survivor revealed: of a dropped device's mask key or of a survivor's self-mask seed.
    The key makes one share per (holder, owner): a holder never reveals both secrets of one device."""

    __tablename__ = "secagg_reveals"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    holder_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "mask_key" | "self_seed"
    share: Mapped[bytes] = mapped_column(LargeBinary)
