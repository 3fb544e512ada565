"""Arm names as data: one arm per proposer (pipeline/proposers/), so the arm CHECK no
longer lists them (the store checks their shape); the lineage proposer's record per
iteration: finetune_losses, finetune_pairs, and repeat_rate (the share of samples that
repeat a move which improved before).

Revision ID: 0006_arms_as_data
Revises: 0005_evaluations
Create Date: 2026-12-08
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_arms_as_data"
down_revision: str | None = "0005_evaluations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the conditions (see 0001_initial.py).
OLD_ARM_CHECK = "arm IN ('lm', 'random')"
NEW_ARM_CHECK = "length(arm) >= 1"
ITERATION_COLUMNS = (("finetune_losses", sa.JSON(none_as_null=True)),
                     ("finetune_pairs", sa.Integer()), ("repeat_rate", sa.Float()))


def _arm_check(table: str, condition: str) -> None:
    name = f"ck_{table}_arm"
    if op.get_context().dialect.name == "sqlite":
        # SQLite cannot alter a constraint: batch mode rebuilds the table.
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.drop_constraint(op.f(name), type_="check")
            batch.create_check_constraint(op.f(name), condition)
        return
    op.drop_constraint(op.f(name), table, type_="check")
    op.create_check_constraint(op.f(name), table, condition)


def upgrade() -> None:
    for table in ("candidates", "iterations"):
        _arm_check(table, NEW_ARM_CHECK)
    for name, typ in ITERATION_COLUMNS:
        op.add_column("iterations", sa.Column(name, typ, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("iterations") as batch:
        for name, _ in reversed(ITERATION_COLUMNS):
            batch.drop_column(name)
    op.execute("DELETE FROM candidates WHERE arm NOT IN ('lm', 'random')")
    op.execute("DELETE FROM iterations WHERE arm NOT IN ('lm', 'random')")
    for table in ("candidates", "iterations"):
        _arm_check(table, OLD_ARM_CHECK)
