"""The tables the Core statements use, and the statuses of a round that is still active."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table

from server_api.orm import ROUND_AGGREGATING, ROUND_OPEN, Assignment, Device, Round, Task

ACTIVE = (ROUND_OPEN, ROUND_AGGREGATING)

_devices = cast(Table, Device.__table__)
_tasks = cast(Table, Task.__table__)
_rounds = cast(Table, Round.__table__)
_assignments = cast(Table, Assignment.__table__)
