"""model embedding dim and task eval set

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 04:39:30.465451
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("embedding_dim", sa.Integer(), nullable=True))

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("eval_set", sa.String(length=64), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("eval_set")

    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("embedding_dim")
