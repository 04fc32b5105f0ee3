"""Pydantic schemas of the HTTP API (separate from the ORM models)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from facefl.algorithms import registry
from facefl.compression import UpdateEncoding

# ids are INTEGER columns (int4 on PostgreSQL): larger numbers are refused with 422 before any query
MAX_ID = 2**31 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID)]

# the keys of facefl.models.ARCHITECTURES (a test keeps them equal; written out so that importing the
# schemas does not import torch)
Architecture = Literal["small", "mobilefacenet", "tiny", "dlib-resnet"]
# the registry's algorithms (facefl.algorithms.registry): the enum of the API's ``algorithm``
Algorithm = Literal[registry.NAMES]  # type: ignore[valid-type]


# C0 and C1 control characters (NUL included: PostgreSQL cannot store it) and lone surrogates (not
# encodable as UTF-8): refused in every string a client sends
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def has_control_chars(text: str) -> bool:
    return _CONTROL.search(text) is not None


def _check_text(value: Any) -> None:
    if isinstance(value, str):
        if has_control_chars(value):
            raise ValueError("control characters are not allowed")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_text(v)


def document_text(schema: dict[str, Any]) -> None:
    """The OpenAPI document says what _no_control_chars enforces: a pattern on every free string."""
    for prop in schema.get("properties", {}).values():
        for option in [prop, *prop.get("anyOf", ())]:
            if option.get("type") == "string" and "enum" not in option and "const" not in option:
                option.setdefault("pattern", "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")


class Strict(BaseModel):
    # strict: JSON types are not coerced (false is not 0, "5" is not 5); floats still accept integers
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, strict=True, json_schema_extra=document_text
    )

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_chars(cls, value: Any) -> Any:
        _check_text(value)  # every string field of every request body (422, never a DataError)
        return value


class Capabilities(Strict):
    accelerator: Annotated[str, Field(max_length=32)] = "cpu"
    num_samples: Annotated[int, Field(ge=0, le=10_000_000)] = 0


class RegisterIn(Strict):
    enrollment_secret: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str | None, Field(max_length=128)] = None
    capabilities: Capabilities | None = None


class RegisterOut(BaseModel):
    device_id: str
    token: str


class RoundOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    task_id: int
    number: int
    status: str
    base_version: int
    result_version: int | None
    target_reports: int
    min_reports: int
    max_assignments: int
    assigned: int
    reported: int
    opened_at: datetime
    deadline: datetime
    closed_at: datetime | None
    metrics: dict[str, Any]
    # the version devices get after this round: result_version when it passed the task's release gate
    # (or there is none), else the base version; None until the round aggregated
    served_version: int | None


class PrivacyOut(BaseModel):
    """What a task with policy.dp has spent: (epsilon, delta) after its aggregated rounds."""

    epsilon: float | None  # null: no finite guarantee (noise_multiplier 0, clipping only)
    delta: float
    rounds: int  # aggregated rounds, each one DP release
    epsilon_budget: float | None
    noise_added_by: Literal["server", "devices"]  # devices: under secure aggregation (distributed DP)


class TaskOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    algorithm: str
    architecture: str
    embedding_dim: int
    image_size: int
    rounds: int
    hyperparams: dict[str, Any]
    policy: dict[str, Any]
    status: str
    eval_set: str | None
    trainable: list[str] | None
    # the served version: the last one that passed the release gate (every version without a gate)
    current_version: int | None
    aggregated_rounds: int
    current_round: RoundOut | None = None
    created_at: datetime
    # policy.dp: the privacy spent so far; null without policy.dp
    privacy: PrivacyOut | None = None


class ModelVersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: int
    task_id: int | None
    parent_version: int | None
    round_id: int | None
    architecture: str
    embedding_dim: int | None
    sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    created_at: datetime
    # False: held back by the task's release gate (recorded, never handed to devices); reason says why
    served: bool
    held_back_reason: str | None


class ParticipantOut(BaseModel):
    """One device's part in a round (ids and counts only: no device data)."""

    device_id: str
    # reported: its update was accepted; pending: the round is still open; dropped: it never reported
    status: Literal["reported", "pending", "dropped"]
    assigned_at: datetime
    reported_at: datetime | None
    update_bytes: int | None
    # the weight the update got in the mean (num_samples, capped by the task's max_sample_weight)
    num_samples: int | None


class DeviceOut(BaseModel):
    id: str
    name: str | None
    created_at: datetime
    last_seen_at: datetime | None
    assignments: int  # rounds it was selected for
    reports: int  # of those, rounds whose update was accepted


class DevicesOut(BaseModel):
    total: int
    devices: list[DeviceOut]  # most recently seen first


class CheckinIn(Strict):
    task_id: Id | None = None
    capabilities: Capabilities | None = None


class AssignmentOut(BaseModel):
    round_id: int
    task_id: int
    round_number: int
    base_version: int
    algorithm: str
    architecture: str
    embedding_dim: int
    image_size: int
    hyperparams: dict[str, Any]
    deadline: datetime
    upload_token: str
    # partial training: the task's parameter groups and their name prefixes (facefl.models
    # trainable_names); the update carries exactly those tensors. None: the whole model
    trainable: list[str] | None
    trainable_prefixes: list[str] | None
    # the task's update encoding and error feedback (policy): devices built before them send float32
    update_encoding: UpdateEncoding = "float32"
    update_error_feedback: bool = False
    # present when the task's policy asks for secure aggregation: the device runs the protocol's stages
    # (docs/protocol.md) instead of one plain upload
    secure_aggregation: SecAggInfo | None = None


class SecAggInfo(BaseModel):
    """What a device needs to clip, weight, noise and quantize its update (facefl.secagg.fixedpoint)."""

    clip_norm: float
    max_sample_weight: int
    noise_stddev: float  # distributed DP: per coordinate of the clipped, weighted delta (0: none)
    max_devices: int  # the cohort is at most this large: the fixed point cannot wrap for it
    bound: float  # each coordinate is clamped to [-bound, bound]
    scale: float  # then rounded as value * scale modulo 2^modulus_bits
    modulus_bits: int
    max_neighbours: int
    stage_timeout_s: float


SecAggStage = Literal["advertise", "share", "upload", "unmask", "done"]


class SecAggKeysIn(Strict):
    """A device's two X25519 public keys for the round, base64 (32 bytes each)."""

    c_public: Annotated[str, Field(min_length=44, max_length=44)]
    s_public: Annotated[str, Field(min_length=44, max_length=44)]


class SecAggMemberOut(BaseModel):
    device_id: str
    c_public: str  # base64
    s_public: str


class SecAggStateOut(BaseModel):
    """One device's view of the round's secure aggregation; each field appears once its stage began."""

    round_id: int
    round_status: str  # open, aggregating, aggregated or abandoned (then the device stops waiting)
    stage: SecAggStage
    deadline: datetime  # the current stage's
    retry_after_s: float  # how long to wait before asking again while the stage runs
    vector_length: int  # uint32 elements of the masked upload: the flattened delta, then the weight
    graph_seed: int | None = None
    roster: list[SecAggMemberOut] | None = None  # share stage on: the cohort, sorted by device id
    sharers: list[str] | None = None  # upload stage on: the devices whose shares were delivered (U2)
    inbox: dict[str, str] | None = None  # upload stage on: encrypted shares for this device, by sender
    uploaders: list[str] | None = None  # unmask stage on: the devices whose masked update arrived (U3)
    # what this device's own requests recorded: request name (keys, shares, masked-update, reveal) ->
    # SHA-256 hex of the content (server_api.services.secagg_resend), so that a device that lost an
    # answer can tell whether its request arrived
    submitted: dict[str, str] = Field(default_factory=dict)


class SecAggAccepted(BaseModel):
    round_id: int
    stage: SecAggStage  # the stage after this request (it may have closed the one it was sent in)


class TrainAction(BaseModel):
    action: Literal["train"] = "train"
    assignment: AssignmentOut


WaitReason = Literal[
    "no_open_round",
    "round_full",
    "already_participated",
    "task_completed",
    "task_paused",
    "privacy_budget_exhausted",
    "no_task",
]


class WaitAction(BaseModel):
    action: Literal["wait"] = "wait"
    retry_after_s: float
    reason: WaitReason


CheckinOut = Annotated[TrainAction | WaitAction, Field(discriminator="action")]


class UpdateAccepted(BaseModel):
    update_id: int
    round_id: int
    reports: int


class HealthOut(BaseModel):
    status: str
    db: str


class ErrorOut(BaseModel):
    detail: str
    code: str
