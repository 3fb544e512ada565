"""Name the CHECK constraints as the models do: ck_<table>_<name>, not ck_<table>_ck_<table>_<name>.

0001_initial gave its CHECK constraints full names ("ck_runs_status") while the
metadata's naming convention (pipeline/store/models.py) prefixes ck_<table>_ again, so
the database got "ck_runs_ck_runs_status". `alembic check` does not compare CHECK
constraints; tests/pipeline/test_store.py now does.

Revision ID: 0003_check_names
Revises: 0002_rescore
Create Date: 2026-12-01
"""
from __future__ import annotations

from typing import Sequence

from alembic import op

revision: str = "0003_check_names"
down_revision: str | None = "0002_rescore"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the conditions at this revision (see 0001_initial.py).
RUN_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
ITERATION_STAGES = ("pending", "training", "generating", "evaluating", "selecting", "done")
DECISIONS = ("kept", "replaced")
ROLES = ("incumbent", "candidate")
ARMS = ("lm", "random")
CANDIDATE_STATUSES = ("pending", "running", "evaluated", "rejected", "invalid", "timeout",
                      "oom", "cancelled")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# table -> [(short name, condition)]
CHECKS = {
    "runs": [("status", _in("status", RUN_STATUSES))],
    "candidates": [("status", _in("status", CANDIDATE_STATUSES)), ("role", _in("role", ROLES)),
                   ("arm", _in("arm", ARMS))],
    "iterations": [("stage", _in("stage", ITERATION_STAGES)),
                   ("decision", f"decision IS NULL OR {_in('decision', DECISIONS)}"),
                   ("arm", _in("arm", ARMS))],
}


def _rename(table: str, pairs: list[tuple[str, str, str]]) -> None:
    """pairs: (old name, new name, condition)."""
    if op.get_context().dialect.name == "sqlite":
        # SQLite cannot rename a constraint: batch mode rebuilds the table.
        with op.batch_alter_table(table, recreate="always") as batch:
            for old, new, condition in pairs:
                batch.drop_constraint(op.f(old), type_="check")
                batch.create_check_constraint(op.f(new), condition)
        return
    for old, new, _ in pairs:
        op.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{old}" TO "{new}"')


def upgrade() -> None:
    for table, checks in CHECKS.items():
        _rename(table, [(f"ck_{table}_ck_{table}_{name}", f"ck_{table}_{name}", cond)
                        for name, cond in checks])


def downgrade() -> None:
    for table, checks in CHECKS.items():
        _rename(table, [(f"ck_{table}_{name}", f"ck_{table}_ck_{table}_{name}", cond)
                        for name, cond in checks])
