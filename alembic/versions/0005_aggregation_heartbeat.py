"""aggregation heartbeat (rounds.aggregation_heartbeat_at)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 02:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rounds", sa.Column("aggregation_heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    # an aggregation in flight during the upgrade counts as alive since it started
    op.execute(
        "UPDATE rounds SET aggregation_heartbeat_at = aggregation_started_at WHERE status = 'aggregating'"
    )


def downgrade() -> None:
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_column("aggregation_heartbeat_at")
