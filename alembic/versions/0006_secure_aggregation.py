"""secure aggregation state (secagg_rounds, secagg_members, secagg_shares, secagg_reveals)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secagg_rounds",
        sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("graph_seed", sa.Integer(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
    )
    op.create_table(
        "secagg_members",
        sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("c_public", sa.LargeBinary(32), nullable=False),
        sa.Column("s_public", sa.LargeBinary(32), nullable=False),
        sa.Column("shared", sa.Boolean(), nullable=False),
        sa.Column("revealed", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "secagg_shares",
        sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("sender_id", sa.String(32), primary_key=True),
        sa.Column("recipient_id", sa.String(32), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "secagg_reveals",
        sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("holder_id", sa.String(32), primary_key=True),
        sa.Column("owner_id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("share", sa.LargeBinary(), nullable=False),
    )


def downgrade() -> None:
    for table in ("secagg_reveals", "secagg_shares", "secagg_members", "secagg_rounds"):
        op.drop_table(table)
