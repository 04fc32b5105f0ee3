"""partial training (tasks.trainable) and the release gate (served versions)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # plain ADD COLUMN (no batch): on SQLite a batch would copy model_versions into a new table and drop
    # the old one, which the foreign keys of existing rounds refuse (PRAGMA foreign_keys=ON)
    op.add_column("tasks", sa.Column("trainable", sa.JSON(), nullable=True))
    op.add_column(
        "model_versions", sa.Column("served", sa.Boolean(), server_default=sa.true(), nullable=False)
    )
    op.add_column("model_versions", sa.Column("held_back_reason", sa.String(length=256), nullable=True))
    op.add_column("rounds", sa.Column("served_version", sa.Integer(), nullable=True))
    # before any gate existed every aggregated round's result was served
    op.execute("UPDATE rounds SET served_version = result_version WHERE status = 'aggregated'")


def downgrade() -> None:
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_column("served_version")

    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("held_back_reason")
        batch_op.drop_column("served")

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("trainable")
