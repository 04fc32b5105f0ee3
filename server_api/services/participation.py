"""Who takes part: each round's participants and the device roster (read-only, for operators)."""

from __future__ import annotations

from typing import Literal

from server_api.errors import not_found
from server_api.orm import ROUND_OPEN, Round
from server_api.schemas import DeviceOut, DevicesOut, ParticipantOut
from server_api.services import queries
from server_api.services.context import ServiceContext


def round_participants(ctx: ServiceContext, round_id: int) -> list[ParticipantOut]:
    """The round's assignments in the order they were issued, with their uploads (404 unknown round)."""
    with ctx.db.read() as s:
        rnd = s.get(Round, round_id)
        if rnd is None:
            raise not_found(f"round {round_id}")
        waiting: Literal["pending", "dropped"] = "pending" if rnd.status == ROUND_OPEN else "dropped"
        return [
            ParticipantOut(
                device_id=a.device_id,
                status="reported" if u is not None else waiting,
                assigned_at=a.issued_at,
                reported_at=u.created_at if u is not None else None,
                update_bytes=u.size_bytes if u is not None else None,
                num_samples=u.num_samples if u is not None else None,
            )
            for a, u in queries.participants_of(s, round_id)
        ]


def devices(ctx: ServiceContext, limit: int, offset: int = 0) -> DevicesOut:
    """A page of registered devices, most recently seen first, with the total count."""
    with ctx.db.read() as s:
        return DevicesOut(
            total=queries.count_devices(s),
            devices=[
                DeviceOut(
                    id=d.id,
                    name=d.name,
                    created_at=d.created_at,
                    last_seen_at=d.last_seen_at,
                    assignments=assigned,
                    reports=reported,
                )
                for d, assigned, reported in queries.devices_page(s, limit, offset)
            ],
        )
