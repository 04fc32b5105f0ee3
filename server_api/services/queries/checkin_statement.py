"""PostgreSQL: a whole check-in in one statement, run in autocommit (one round trip instead of five:
BEGIN, touch, view, assignment, COMMIT), with the same answers and writes as the check-in transaction of
:func:`server_api.services.rounds.checkin_transaction`.

The statement's CTEs touch the device, read the check-in's view (the same SELECT as
:func:`~server_api.services.queries.hot_path.checkin_view`), and then either claim a slot and insert the
assignment, or give the device's unreported assignment a new upload token, when the task and round take
check-ins. It returns the view and what it wrote; the caller decides the answer from the view
(``rounds.decide``, the one definition of the outcomes and wait reasons). The write conditions are that
decision's "take" and "renew" outcomes written in SQL; tests/server_api/test_checkin_statement.py checks
on real PostgreSQL that both paths agree for every kind of state.

Concurrency (READ COMMITTED). The transaction path touches the device first, and its next statement takes
a snapshot once that row lock is held: it sees every earlier check-in of the device. One statement has
one snapshot, taken before it waits for any lock, so a check-in of the same device that commits while
this statement waits for the device's row would be invisible to the view (both could see no assignment).
The touch therefore only updates the row version the snapshot saw (``xmin`` unchanged): a concurrent
update of the device row makes PostgreSQL re-check the WHERE on the newest version, which then fails; the
touch returns no row, and every other write of the statement is conditional on the touch, so the statement
writes nothing and the caller runs the transaction path, which waits for the lock and reads afresh. When
the touch succeeds, no check-in of the device committed since the snapshot (and none can until this
statement commits): the view holds every one the transaction path would see after its touch (only
check-ins create or renew a device's assignment, and they all update its row). Other rows may change
after the snapshot, as they may after the transaction path's view: slot claims are compare-and-set on the
round row (re-checked on its newest version) as before, and an upload that marks the assignment reported
meanwhile races with a renewal as it does there. The lock order (device, then round or assignment) is
the transaction path's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    and_,
    bindparam,
    literal,
    literal_column,
    select,
    true,
    update,
)

from server_api.driver import DriverTransaction, Prepared
from server_api.orm import ROUND_OPEN, TASK_RUNNING
from server_api.services.queries._tables import _assignments, _devices, _rounds
from server_api.services.queries.hot_path import (
    _CHECKIN_VIEW_DEFAULT,
    _CHECKIN_VIEW_OF_TASK,
    CheckinView,
    assignment_of_claim,
    claim_slot,
    view_of_row,
)


@dataclass(frozen=True)
class CheckinDone:
    """What the one-statement check-in read and wrote."""

    view: CheckinView | None
    took: bool  # claimed a slot and inserted the assignment
    renewed: bool  # replaced the assignment's upload token


def _statement(view_select: Prepared, with_capabilities: bool) -> Prepared:
    d, r, a = _devices, _rounds, _assignments
    seen = d.alias("seen")
    # the xmin of the device row this statement's snapshot sees (an InitPlan: evaluated on that snapshot,
    # and kept when the touch re-checks its WHERE on a concurrently updated row)
    seen_version = (
        select(literal_column("seen.xmin")).where(seen.c.id == bindparam("device_id")).scalar_subquery()
    )
    values: dict[str, Any] = {"last_seen_at": bindparam("now")}
    if with_capabilities:
        values["capabilities"] = bindparam("caps")
    touched = (
        update(d)
        .where(d.c.id == bindparam("device_id"), literal_column("devices.xmin") == seen_version)
        .values(**values)
        .returning(d.c.id)
        .cte("touched")
    )
    did_touch = select(touched.c.id).exists()
    view: CTE = view_select.statement.cte("v")  # type: ignore[attr-defined]
    cols = list(view.c)  # CheckinView's fields, then ActiveRound's (see hot_path._checkin_view)
    task_status, round_id, round_status, deadline, assignment_id, reported = (
        cols[1], cols[9], cols[11], cols[13], cols[14], cols[15],
    )  # fmt: skip
    # rounds.decide's "take"/"renew" outcomes: a running task whose active round is open, before its
    # deadline, and the device's assignment in it (none: take; unreported: renew)
    takes_checkins: ColumnElement[bool] = and_(
        task_status == TASK_RUNNING, round_status == ROUND_OPEN, deadline > bindparam("now")
    )
    claimed = (
        claim_slot(select(round_id).where(takes_checkins, assignment_id.is_(None)).scalar_subquery())
        .where(did_touch)
        .returning(r.c.id)
        .cte("claimed")
    )
    inserted = assignment_of_claim(claimed).returning(a.c.id).cte("inserted")
    renewed = (
        update(a)
        .where(
            a.c.id == select(assignment_id).where(takes_checkins, reported.is_(False)).scalar_subquery(),
            did_touch,
        )
        .values(upload_token_hash=bindparam("token_hash"))
        .returning(a.c.id)
        .cte("renewed")
    )
    one = select(literal(1).label("one")).subquery("one")  # a row even when there is no such task
    return Prepared(
        select(
            did_touch.label("touched"),
            select(inserted.c.id).exists().label("took"),
            select(renewed.c.id).exists().label("renewed"),
            *cols,
        ).select_from(one.outerjoin(view, true()))
    )


_STATEMENTS = {
    (of_task, caps): _statement(_CHECKIN_VIEW_OF_TASK if of_task else _CHECKIN_VIEW_DEFAULT, caps)
    for of_task in (True, False)
    for caps in (True, False)
}


def checkin_at_once(
    tx: DriverTransaction,
    task_id: int | None,
    device_id: str,
    now: datetime,
    capabilities: dict[str, Any] | None,
    token_hash: str,
) -> CheckinDone | None:
    """The check-in's statement (PostgreSQL, on an autocommit connection); None when it wrote nothing
    because the device's row changed after its snapshot (a concurrent check-in of the same device, or no
    such device): the caller runs the check-in transaction instead."""
    statement = _STATEMENTS[(task_id is not None, capabilities is not None)]
    params = {"device_id": device_id, "now": now, "token_hash": token_hash, "task_id": task_id}
    if capabilities is not None:
        params["caps"] = capabilities
    row = tx.first(statement, params)
    assert row is not None  # the outer join returns one row
    if not row[0]:
        return None
    return CheckinDone(view_of_row(row[3:]), took=bool(row[1]), renewed=bool(row[2]))
