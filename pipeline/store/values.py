"""Value hygiene for the store: what goes into a column is bounded, finite and storable
on both backends (pipeline/store/api.py calls these)."""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

from pipeline.store.errors import UnknownCandidate
from pipeline.store.models import DECISIONS, ITERATION_STAGES, utcnow
# What a sandbox may send back is what the store keeps: the wire format's bounds.
from sandbox.schema import MAX_LOG_CHARS, MAX_REASON_CHARS

ITERATION_FIELDS = {"stage", "incumbent_id", "selected_id", "decision", "lm_losses",
                    "lm_seconds", "gen_seconds", "eval_seconds", "finished_at",
                    "lm_copy_accuracy", "lm_p_intact", "lm_stop", "single_edit_rate",
                    "finetune_losses", "finetune_pairs", "repeat_rate"}


def text(value: str) -> str:
    # PostgreSQL text cannot hold NUL characters; SQLite can. Replace them so both
    # backends store the same thing (sandbox logs of a crashing candidate may have them).
    return value.replace("\x00", "\ufffd")


def bound_reason(reason: str) -> str:
    reason = text(reason or "")
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 1] + "…"
    return reason


def bound_logs(logs: str) -> str:
    # Keep the tail: the end of a log is where the error is.
    logs = text(logs or "")
    if len(logs) > MAX_LOG_CHARS:
        marker = f"[… {len(logs) - MAX_LOG_CHARS} characters cut …]\n"
        logs = marker + logs[-(MAX_LOG_CHARS - len(marker)):]
    return logs


def floats(values: Iterable[Any], what: str) -> list[float | None]:
    # JSON has no NaN or infinity (PostgreSQL refuses the tokens): a diverged step is
    # stored as null, which keeps the curve's length and the step numbering.
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what} must be a list of numbers, got {type(v).__name__}")
        out.append(float(v) if math.isfinite(v) else None)
    return out


def finite(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def iteration_values(fields: dict[str, Any], allowed: set[str],
                      to_stage: str | None = None) -> dict[str, Any]:
    """Checked, normalised column values for an iteration update (update_iteration,
    advance_stage). `to_stage`: the stage the update moves it to, when not in `fields`."""
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"cannot update iteration field(s) {', '.join(sorted(unknown))}")
    fields = dict(fields)
    stage = fields.get("stage", to_stage)
    if stage is not None:
        check(stage, ITERATION_STAGES, "iteration stage")
    if fields.get("decision") is not None:
        check(fields["decision"], DECISIONS, "decision")
    if "lm_losses" in fields:
        fields["lm_losses"] = floats(fields["lm_losses"] or [], "lm_losses")
    if fields.get("finetune_losses") is not None:
        fields["finetune_losses"] = floats(fields["finetune_losses"], "finetune_losses")
    if fields.get("finetune_pairs") is not None:
        fields["finetune_pairs"] = int(fields["finetune_pairs"])
    for name in ("lm_seconds", "gen_seconds", "eval_seconds", "lm_copy_accuracy",
                 "lm_p_intact", "single_edit_rate", "repeat_rate"):
        if name in fields:
            fields[name] = finite(fields[name], name)
    if stage == "done":
        fields.setdefault("finished_at", utcnow())
    return fields


# The proposer registry's name rule (pipeline/proposers/__init__.py NAME_PATTERN), kept
# here too so that the store needs nothing from the pipeline above it.
ARM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,15}$")


def arm_name(arm: Any) -> str:
    if not isinstance(arm, str) or not ARM_NAME.match(arm):
        raise ValueError(f"bad arm name {arm!r} (lower-case letters, digits and _, at most 16)")
    return arm


def check(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (one of {', '.join(allowed)})")


def candidate_key(candidate_id: Any) -> int:
    try:
        return int(candidate_id)
    except (TypeError, ValueError):
        raise UnknownCandidate(f"unknown candidate {candidate_id!r}") from None
