"""Re-scoring of would-be winners: candidates.rescore and candidates.flagged.

Revision ID: 0002_rescore
Revises: 0001_initial
Create Date: 2026-11-26
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_rescore"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("candidates") as batch:
        batch.add_column(sa.Column("rescore", sa.Float(), nullable=True))
        batch.add_column(sa.Column("flagged", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("candidates") as batch:
        batch.drop_column("flagged")
        batch.drop_column("rescore")
