"""The lineage database: one store API (api.py), its views (views.py), the ORM and the
status words (models.py), engines and migrations (schema.py, migrations/).

Only the public API is re-exported here.
"""
from pipeline.store.api import LineageStore, store_for
from pipeline.store.errors import SchemaOutOfDate, StoreError, UnknownCandidate, UnknownRun
from pipeline.store.models import (CANDIDATE_STATUSES, DECISIONS, ITERATION_STAGES,
                                   OPEN_STATUSES, ROLES, RUN_ACTIVE_STATUSES, RUN_STATUSES,
                                   RUN_TERMINAL_STATUSES, TERMINAL_STATUSES)
from pipeline.store.schema import (MIGRATIONS_DIR, alembic_config, current_revisions,
                                   head_revisions, make_engine, schema_is_current,
                                   upgrade_schema)
from pipeline.store.values import MAX_LOG_CHARS, MAX_REASON_CHARS
from pipeline.store.views import CandidateView, CurveView, EvaluationView, IterationView, RunView

__all__ = [
    "LineageStore", "store_for", "StoreError", "UnknownRun", "UnknownCandidate",
    "SchemaOutOfDate", "CANDIDATE_STATUSES", "DECISIONS", "ITERATION_STAGES",
    "OPEN_STATUSES", "ROLES", "RUN_ACTIVE_STATUSES", "RUN_STATUSES", "RUN_TERMINAL_STATUSES",
    "TERMINAL_STATUSES", "MIGRATIONS_DIR", "alembic_config", "current_revisions",
    "head_revisions", "make_engine", "schema_is_current", "upgrade_schema",
    "CandidateView", "CurveView", "EvaluationView", "IterationView", "RunView", "MAX_LOG_CHARS", "MAX_REASON_CHARS",
]
