"""How well each iteration's LM copies its input, and each candidate's declaration.

iterations: lm_copy_accuracy, lm_p_intact, lm_stop, single_edit_rate
(sandbox/lm_schedule.py); candidates: declaration (the self task's declared model and
learning dynamics, sandbox/schema.py Declaration). Nullable columns added in place: no
table rebuild (so no foreign-key cascade can fire on SQLite).

Revision ID: 0004_lm_metrics
Revises: 0003_check_names
Create Date: 2026-12-02
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_lm_metrics"
down_revision: str | None = "0003_check_names"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ITERATION_COLUMNS = (("lm_copy_accuracy", sa.Float()), ("lm_p_intact", sa.Float()),
                     ("lm_stop", sa.String(16)), ("single_edit_rate", sa.Float()))


def upgrade() -> None:
    for name, typ in ITERATION_COLUMNS:
        op.add_column("iterations", sa.Column(name, typ, nullable=True))
    op.add_column("candidates", sa.Column("declaration", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("candidates") as batch:
        batch.drop_column("declaration")
    with op.batch_alter_table("iterations") as batch:
        for name, _ in reversed(ITERATION_COLUMNS):
            batch.drop_column(name)
