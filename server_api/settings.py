"""Server settings: one pydantic-settings class read from FACEFL_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from facefl.devmode import DEV_ADMIN_TOKEN, DEV_ENROLLMENT_SECRET

__all__ = ["DEV_ADMIN_TOKEN", "DEV_ENROLLMENT_SECRET", "Settings", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEFL_", env_file=None, extra="ignore")

    database_url: str = Field(
        default="sqlite:///facefl-data/facefl.db",
        description="SQLAlchemy URL; SQLite file by default, postgresql+psycopg://... for several workers",
    )
    data_dir: Path = Field(
        default=Path("facefl-data"), description="blob store root (model versions content-addressed)"
    )
    dev_mode: bool = Field(default=False, description="allow the well-known dev admin token and secret")
    admin_token: SecretStr | None = None
    enrollment_secret: SecretStr | None = None
    max_upload_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="upload bodies above it: 413 (refused while streaming)"
    )
    max_json_bytes: int = Field(
        default=8192,
        gt=0,
        description="every other body (JSON) above it: 413, before authentication and parsing",
    )
    body_idle_timeout_s: float = Field(
        default=30.0, gt=0, description="no body bytes for this long: 408 (its staging file is deleted)"
    )
    body_deadline_s: float = Field(
        default=900.0, gt=0, description="a body not complete this long after its request started: 408"
    )
    max_concurrent_uploads: int = Field(
        default=32, ge=1, description="uploads in flight per worker process; beyond it 503 + Retry-After"
    )
    tick_interval_s: float = Field(default=1.0, gt=0, description="how often deadlines are checked")
    min_retry_after_s: float = Field(default=1.0, ge=0, description="pace steering: shortest Retry-After")
    max_retry_after_s: float = Field(default=60.0, gt=0)
    aggregation_lease_s: float = Field(
        default=15.0,
        gt=0,
        description="an aggregation whose heartbeat (renewed every lease/5 s while it runs) is older than "
        "this is taken over by another worker: its worker died",
    )
    migrate_on_start: bool = True
    rate_limit_per_s: float = Field(
        default=20.0,
        ge=0,
        description="requests per second each device may make, sustained (token bucket per worker process; "
        "0 turns the limit off); above it: 429 with Retry-After",
    )
    rate_limit_burst: float = Field(default=60.0, ge=1, description="token bucket size: the allowed burst")
    register_rate_per_s: float = Field(
        default=1.0,
        ge=0,
        description="registrations per second per client address, sustained (0: off); above it 429",
    )
    register_burst: float = Field(default=20.0, ge=1, description="registrations per client address: burst")
    register_global_rate_per_s: float = Field(
        default=10.0,
        ge=0,
        description="registrations per second from all addresses together, per worker (0: off)",
    )
    register_global_burst: float = Field(default=100.0, ge=1, description="registrations in all: burst")
    log_format: Literal["plain", "json"] = Field(
        default="plain", description="json: one JSON object per line (with round_id, device_id, ...)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    eval_sets: dict[str, Path] = Field(
        default_factory=dict,
        description='held-out generic sets a task may name, as JSON: {"lfw": "/data/lfw"} (LFW layout with '
        "pairs.txt: its test folds 6-10; any other image folder: pairs built from it)",
    )
    public_sets: dict[str, Path] = Field(
        default_factory=dict,
        description='public face sets a FedFR task may name, as JSON: {"lfw-public": "/data/lfw"} '
        "(LFW layout: "
        "its public split, test folds excluded; any other image folder: all of it)",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _require_secrets_outside_dev(self) -> Settings:
        if self.dev_mode:
            if self.admin_token is None:
                self.admin_token = SecretStr(DEV_ADMIN_TOKEN)
            if self.enrollment_secret is None:
                self.enrollment_secret = SecretStr(DEV_ENROLLMENT_SECRET)
        missing = [
            name
            for name, value in (
                ("FACEFL_ADMIN_TOKEN", self.admin_token),
                ("FACEFL_ENROLLMENT_SECRET", self.enrollment_secret),
            )
            if value is None or len(value.get_secret_value()) < 8
        ]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} must be set (at least 8 characters) unless FACEFL_DEV_MODE=1"
            )
        if self.min_retry_after_s > self.max_retry_after_s:
            raise ValueError("FACEFL_MIN_RETRY_AFTER_S exceeds FACEFL_MAX_RETRY_AFTER_S")
        return self

    @property
    def admin_token_value(self) -> str:
        assert self.admin_token is not None  # guaranteed by the validator
        return self.admin_token.get_secret_value()

    @property
    def enrollment_secret_value(self) -> str:
        assert self.enrollment_secret is not None
        return self.enrollment_secret.get_secret_value()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
