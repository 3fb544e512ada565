"""The lineage schema: runs, their iterations, every candidate ever produced, curves.

These ORM models are the single description of the schema. The Alembic migrations in
migrations/versions/ (top level) must create exactly this (`alembic check` passes,
and tests/pipeline/test_store.py compares constraint and index names, CHECKs included), so any
change here goes together with a new migration.

The status words, stage names and terminal sets below are the one home of those words
for the whole pipeline.

Status-like columns are plain strings guarded by CHECK constraints rather than database
enums: enums need ALTER TYPE dances on PostgreSQL and do not exist on SQLite, while a
check constraint behaves the same on both.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey,
                        Integer, MetaData, String, Text, UniqueConstraint)
from sqlalchemy.sql.expression import false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
RUN_TERMINAL_STATUSES = ("completed", "failed", "cancelled")
RUN_ACTIVE_STATUSES = ("pending", "running")
ITERATION_STAGES = ("pending", "training", "generating", "evaluating", "selecting", "done")
DECISIONS = ("kept", "replaced")
ROLES = ("incumbent", "candidate")
# Arm names are data (one per proposer, pipeline/proposers/): the store checks their
# shape (values.arm_name), the database only that one is there.
ARM_CHECK = "length(arm) >= 1"
CANDIDATE_STATUSES = ("pending", "running", "evaluated", "rejected", "invalid", "timeout",
                      "oom", "cancelled")
TERMINAL_STATUSES = ("evaluated", "rejected", "invalid", "timeout", "oom", "cancelled")
OPEN_STATUSES = ("pending", "running")   # a candidate not yet in a final state
# An evaluation: claimed by one evaluator and running, done (its outcome may be reused),
# or discarded (its outcome says nothing about the source: a timeout, a crash; the next
# claimant runs it again).
EVALUATION_STATUSES = ("running", "done", "discarded")

# Deterministic constraint and index names: the migration and the models must name
# things the same way on every backend, or `alembic check` reports phantom differences.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _in(column: str, values: tuple[str, ...]) -> str:
    # CHECK constraint text; the values are our own constants, never user input.
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# JSON columns store Python None as SQL NULL (not the JSON literal null), so that
# "no design" and "IS NULL" mean the same thing.
JSONValue = JSON(none_as_null=True)
Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(_in("status", RUN_STATUSES), name="status"),)

    id: Mapped[str] = mapped_column(String(12), primary_key=True, default=new_run_id)
    task: Mapped[str] = mapped_column(String(64))
    preset: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (
        UniqueConstraint("run_id", "arm", "iteration", "index"),
        CheckConstraint(_in("status", CANDIDATE_STATUSES), name="status"),
        CheckConstraint(_in("role", ROLES), name="role"),
        CheckConstraint(ARM_CHECK, name="arm"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)
    index: Mapped[int] = mapped_column(Integer)  # 0: the incumbent, 1..n: generated
    role: Mapped[str] = mapped_column(String(16))
    arm: Mapped[str] = mapped_column(String(16), default="lm")
    # The seed's incumbent has no parent; every other candidate points at the source
    # it was generated from (or copied from, for incumbents).
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("candidates.id", ondelete="SET NULL"), nullable=True, index=True)
    source: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    design: Mapped[dict[str, Any] | None] = mapped_column(JSONValue, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    param_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    logs: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # Reward-hacking guard: a would-be winner is scored again in a fresh sandbox; if the
    # two scores disagree it is flagged and never selected.
    rescore: Mapped[float | None] = mapped_column(Float, nullable=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # the self task: the model and learning dynamics the candidate's code declared
    # (sandbox/schema.py Declaration); what the harness then built, trained and scored
    declaration: Mapped[dict[str, Any] | None] = mapped_column(JSONValue, nullable=True)
    # The evaluation that scored it (pipeline/evaluations.py: the key of everything that
    # decides a score) and whether its outcome was reused instead of run again.
    evaluation_key: Mapped[str | None] = mapped_column(
        ForeignKey("evaluations.key", ondelete="SET NULL"), nullable=True, index=True)
    reused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Evaluation(Base):
    """One evaluation per key, whichever run or worker asked for it first: the stored
    outcome of a job (pipeline/evaluations.py), its provenance and what it cost.

    A worker claims a key by inserting its row (`running`, the unique key decides the
    race) or by a compare-and-set on a discarded or stale claim; only the claimant's
    write completes it."""
    __tablename__ = "evaluations"
    __table_args__ = (CheckConstraint(_in("status", EVALUATION_STATUSES), name="status"),)

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    claimant: Mapped[str] = mapped_column(String(128))
    parts: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    # the sandbox's outcome as the candidate records it
    result_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    param_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    logs: Mapped[str] = mapped_column(Text, default="")
    losses: Mapped[list[float] | None] = mapped_column(JSONValue, nullable=True)
    declaration: Mapped[dict[str, Any] | None] = mapped_column(JSONValue, nullable=True)
    # provenance and cost: the backend identity the worker used, its host, and what the
    # sandbox spent (sandbox/schema.py Result.usage)
    backend: Mapped[str | None] = mapped_column(String(200), nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    wall_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    cpu_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_rss_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    # who ran it first (a run may be deleted; the evaluation stays)
    run_id: Mapped[str | None] = mapped_column(String(12), nullable=True)
    reuses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claimed_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class Iteration(Base):
    __tablename__ = "iterations"
    __table_args__ = (
        UniqueConstraint("run_id", "arm", "index"),
        CheckConstraint(_in("stage", ITERATION_STAGES), name="stage"),
        CheckConstraint(f"decision IS NULL OR {_in('decision', DECISIONS)}", name="decision"),
        CheckConstraint(ARM_CHECK, name="arm"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    arm: Mapped[str] = mapped_column(String(16), default="lm")
    stage: Mapped[str] = mapped_column(String(16), default="pending")
    source_in: Mapped[str] = mapped_column(Text)
    incumbent_id: Mapped[int | None] = mapped_column(
        ForeignKey("candidates.id", ondelete="SET NULL"), nullable=True)
    selected_id: Mapped[int | None] = mapped_column(
        ForeignKey("candidates.id", ondelete="SET NULL"), nullable=True)
    decision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    lm_losses: Mapped[list[float]] = mapped_column(JSONValue, default=list)
    lm_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    gen_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # how well this iteration's LM copies its input (sandbox/lm_schedule.py), why its
    # training stopped, and the share of its samples that changed exactly one parameter
    lm_copy_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    lm_p_intact: Mapped[float | None] = mapped_column(Float, nullable=True)
    lm_stop: Mapped[str | None] = mapped_column(String(16), nullable=True)
    single_edit_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the lineage proposer's fine-tuning before it sampled (pipeline/proposers/lineage.py):
    # its loss per step and how many lineage pairs it learned from; and the share of the
    # iteration's samples that repeat a move which improved on its parent before
    finetune_losses: Mapped[list[float] | None] = mapped_column(JSONValue, nullable=True)
    finetune_pairs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    repeat_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class MetricCurve(Base):
    __tablename__ = "metric_curves"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    candidate_id: Mapped[int | None] = mapped_column(
        ForeignKey("candidates.id", ondelete="CASCADE"), nullable=True, index=True)
    iteration: Mapped[int | None] = mapped_column(Integer, nullable=True)
    name: Mapped[str] = mapped_column(String(64))
    values: Mapped[list[float | None]] = mapped_column(JSONValue, default=list)
