"""The evaluation cache: one row per evaluation key, candidates pointing at theirs.

evaluations: an evaluation's key (pipeline/evaluations.py), its claim, its outcome, its
provenance and cost (pipeline/store/models.py `Evaluation`); candidates: evaluation_key
(a foreign key, SET NULL) and reused. The candidates table is rebuilt on SQLite for the
foreign key (batch mode; the migration runs with foreign keys off, migrations/env.py).

Revision ID: 0005_evaluations
Revises: 0004_lm_metrics
Create Date: 2026-12-08
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_evaluations"
down_revision: str | None = "0004_lm_metrics"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVALUATION_STATUSES = ("running", "done", "discarded")


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "evaluations",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("claimant", sa.String(128), nullable=False),
        sa.Column("parts", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("result_status", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("param_count", sa.BigInteger(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("logs", sa.Text(), nullable=False),
        sa.Column("losses", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("declaration", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("backend", sa.String(200), nullable=True),
        sa.Column("host", sa.String(200), nullable=True),
        sa.Column("wall_s", sa.Float(), nullable=True),
        sa.Column("cpu_s", sa.Float(), nullable=True),
        sa.Column("peak_rss_mb", sa.Float(), nullable=True),
        sa.Column("run_id", sa.String(12), nullable=True),
        sa.Column("reuses", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("claimed_at", ts, nullable=False),
        sa.Column("finished_at", ts, nullable=True),
        sa.CheckConstraint("status IN ({})".format(", ".join(repr(v) for v in EVALUATION_STATUSES)),
                           name=op.f("ck_evaluations_status")),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_evaluations")),
    )
    with op.batch_alter_table("candidates") as batch:
        batch.add_column(sa.Column("evaluation_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("reused", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.create_foreign_key(op.f("fk_candidates_evaluation_key_evaluations"), "evaluations",
                                 ["evaluation_key"], ["key"], ondelete="SET NULL")
        batch.create_index(op.f("ix_candidates_evaluation_key"), ["evaluation_key"])


def downgrade() -> None:
    with op.batch_alter_table("candidates") as batch:
        batch.drop_index(op.f("ix_candidates_evaluation_key"))
        batch.drop_constraint(op.f("fk_candidates_evaluation_key_evaluations"), type_="foreignkey")
        batch.drop_column("reused")
        batch.drop_column("evaluation_key")
    op.drop_table("evaluations")
