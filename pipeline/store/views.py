"""What the store hands out: frozen views of rows, never live ORM objects, so callers
cannot trip over detached instances or lazy loads."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.store.models import TERMINAL_STATUSES, Base


@dataclass(frozen=True)
class RunView:
    id: str
    task: str
    preset: str
    seed: int
    config: dict[str, Any]
    status: str
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class IterationView:
    id: int
    run_id: str
    index: int
    arm: str
    stage: str
    source_in: str
    incumbent_id: int | None
    selected_id: int | None
    decision: str | None
    lm_losses: list[float | None]
    lm_seconds: float | None
    gen_seconds: float | None
    eval_seconds: float | None
    lm_copy_accuracy: float | None
    lm_p_intact: float | None
    lm_stop: str | None
    single_edit_rate: float | None
    created_at: datetime
    finished_at: datetime | None
    finetune_losses: list[float | None] | None = None
    finetune_pairs: int | None = None
    repeat_rate: float | None = None


@dataclass(frozen=True)
class CandidateView:
    id: int
    run_id: str
    iteration: int
    index: int
    role: str
    arm: str
    parent_id: int | None
    source: str
    sha256: str
    design: dict[str, Any] | None
    status: str
    reason: str
    score: float | None
    param_count: int | None
    duration_s: float | None
    logs: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rescore: float | None = None
    flagged: bool = False
    declaration: dict[str, Any] | None = None
    evaluation_key: str | None = None
    reused: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class EvaluationView:
    key: str
    status: str
    claimant: str
    parts: dict[str, Any]
    result_status: str | None
    reason: str
    score: float | None
    param_count: int | None
    duration_s: float | None
    logs: str
    losses: list[float | None] | None
    declaration: dict[str, Any] | None
    backend: str | None
    host: str | None
    wall_s: float | None
    cpu_s: float | None
    peak_rss_mb: float | None
    run_id: str | None
    reuses: int
    claimed_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class CurveView:
    id: int
    run_id: str
    candidate_id: int | None
    iteration: int | None
    name: str
    values: list[float | None]


def _aware(value: Any) -> Any:
    # SQLite keeps no time zone: everything is written in UTC, so say so on the way out.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def view(cls: type, row: Base, blank: tuple[str, ...] = ()) -> Any:
    """The frozen view `cls` of an ORM row; the text fields named in `blank` (not
    loaded) read as ""."""
    return cls(**{f.name: "" if f.name in blank else _aware(getattr(row, f.name))
                  for f in dataclasses.fields(cls)})
