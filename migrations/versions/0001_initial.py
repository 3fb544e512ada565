"""Initial lineage schema: runs, candidates, iterations, metric curves.

Revision ID: 0001_initial
Revises:
Create Date: 2025-11-26
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The values below are frozen copies of the constants in pipeline/store/models.py at
# this revision: a migration must not change meaning when the models move on.
RUN_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
ITERATION_STAGES = ("pending", "training", "generating", "evaluating", "selecting", "done")
DECISIONS = ("kept", "replaced")
ROLES = ("incumbent", "candidate")
ARMS = ("lm", "random")
CANDIDATE_STATUSES = ("pending", "running", "evaluated", "rejected", "invalid", "timeout",
                      "oom", "cancelled")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _json() -> sa.JSON:
    return sa.JSON(none_as_null=True)


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(12), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("preset", sa.String(64), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("config", _json(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.CheckConstraint(_in("status", RUN_STATUSES), name="ck_runs_status"),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_created_at", "runs", ["created_at"])

    op.create_table(
        "candidates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(12), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("arm", sa.String(16), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("design", _json(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("param_count", sa.BigInteger(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("logs", sa.Text(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.CheckConstraint(_in("status", CANDIDATE_STATUSES), name="ck_candidates_status"),
        sa.CheckConstraint(_in("role", ROLES), name="ck_candidates_role"),
        sa.CheckConstraint(_in("arm", ARMS), name="ck_candidates_arm"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name="fk_candidates_run_id_runs"),
        sa.ForeignKeyConstraint(["parent_id"], ["candidates.id"], ondelete="SET NULL",
                                name="fk_candidates_parent_id_candidates"),
        sa.PrimaryKeyConstraint("id", name="pk_candidates"),
        sa.UniqueConstraint("run_id", "arm", "iteration", "index",
                            name="uq_candidates_run_id_arm_iteration_index"),
    )
    op.create_index("ix_candidates_parent_id", "candidates", ["parent_id"])
    op.create_index("ix_candidates_sha256", "candidates", ["sha256"])
    op.create_index("ix_candidates_status", "candidates", ["status"])

    op.create_table(
        "iterations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(12), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("arm", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("source_in", sa.Text(), nullable=False),
        sa.Column("incumbent_id", sa.Integer(), nullable=True),
        sa.Column("selected_id", sa.Integer(), nullable=True),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("lm_losses", _json(), nullable=False),
        sa.Column("lm_seconds", sa.Float(), nullable=True),
        sa.Column("gen_seconds", sa.Float(), nullable=True),
        sa.Column("eval_seconds", sa.Float(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.CheckConstraint(_in("stage", ITERATION_STAGES), name="ck_iterations_stage"),
        sa.CheckConstraint(f"decision IS NULL OR {_in('decision', DECISIONS)}",
                           name="ck_iterations_decision"),
        sa.CheckConstraint(_in("arm", ARMS), name="ck_iterations_arm"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name="fk_iterations_run_id_runs"),
        sa.ForeignKeyConstraint(["incumbent_id"], ["candidates.id"], ondelete="SET NULL",
                                name="fk_iterations_incumbent_id_candidates"),
        sa.ForeignKeyConstraint(["selected_id"], ["candidates.id"], ondelete="SET NULL",
                                name="fk_iterations_selected_id_candidates"),
        sa.PrimaryKeyConstraint("id", name="pk_iterations"),
        sa.UniqueConstraint("run_id", "arm", "index", name="uq_iterations_run_id_arm_index"),
    )

    op.create_table(
        "metric_curves",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(12), nullable=False),
        sa.Column("candidate_id", sa.Integer(), nullable=True),
        sa.Column("iteration", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("values", _json(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name="fk_metric_curves_run_id_runs"),
        sa.ForeignKeyConstraint(["candidate_id"], ["candidates.id"], ondelete="CASCADE",
                                name="fk_metric_curves_candidate_id_candidates"),
        sa.PrimaryKeyConstraint("id", name="pk_metric_curves"),
    )
    op.create_index("ix_metric_curves_run_id", "metric_curves", ["run_id"])
    op.create_index("ix_metric_curves_candidate_id", "metric_curves", ["candidate_id"])


def downgrade() -> None:
    op.drop_table("metric_curves")
    op.drop_table("iterations")
    op.drop_table("candidates")
    op.drop_table("runs")
