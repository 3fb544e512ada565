"""Summaries of runs, shared by the CLI and the plots: one row per iteration, a run's
best score, each arm's start and end, and the short text forms of scores and designs."""
from __future__ import annotations

import difflib
from datetime import datetime
from typing import Any, Sequence

from pipeline.store import CandidateView, IterationView, LineageStore, RunView

# Short names for the transformer design parameters in tables; other keys print as is.
_SHORT = {"num_layers": "enc", "num_decoder_layers": "dec", "num_heads": "heads"}


def direction(task: str) -> str:
    """"min" when the task's score is a loss, "max" for an accuracy (pipeline/catalog.py).
    A task this installation does not know (an old run's) reads as an accuracy."""
    from pipeline.catalog import get_task
    try:
        return get_task(task).direction
    except (ValueError, LookupError):
        return "max"


def fmt_score(score: float | None) -> str:
    if score is None:
        return "-"
    return f"{score:.4f}" if abs(score) < 1e4 else f"{score:.4g}"


def fmt_time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def fmt_design(design: dict[str, Any] | None) -> str:
    if not design:
        return "-"
    parts = []
    for key, value in design.items():
        if isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{_SHORT.get(key, key)}={value}")
    return " ".join(parts)


def fmt_steps(row: dict[str, Any]) -> str:
    """LM steps of an iteration row, and why training stopped unless it met its
    criterion ("1500", "3000 budget")."""
    if row["lm_steps"] is None:
        return "-"
    stop = row["lm_stop"]
    return f"{row['lm_steps']}" + (f" {stop}" if stop and stop != "criterion" else "")


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def shorten(text: str, width: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def iteration_rows(iterations: Sequence[IterationView],
                   candidates: Sequence[CandidateView]) -> list[dict[str, Any]]:
    """One summary per iteration: the selected source, its score, the incumbent's, the fate."""
    by_id = {c.id: c for c in candidates}
    rows = []
    for it in iterations:
        selected = by_id.get(it.selected_id)
        incumbent = by_id.get(it.incumbent_id)
        generated = [c for c in candidates if c.arm == it.arm and c.iteration == it.index
                     and c.role == "candidate"]
        rows.append({
            "index": it.index,
            "arm": it.arm,
            "stage": it.stage,
            "selected_id": it.selected_id,
            "design": selected.design if selected else None,
            "score": selected.score if selected else None,
            "incumbent_id": it.incumbent_id,
            "incumbent_score": incumbent.score if incumbent else None,
            "decision": it.decision,
            "evaluated": sum(c.status == "evaluated" for c in generated),
            "total": len(generated),
            # the LM's training (sandbox/lm_schedule.py) and what its samples did
            "lm_steps": len(it.lm_losses) if it.lm_losses else None,
            "lm_copy_accuracy": it.lm_copy_accuracy,
            "lm_p_intact": it.lm_p_intact,
            "lm_stop": it.lm_stop,
            "single_edit_rate": it.single_edit_rate,
        })
    return rows


def run_record(run: RunView) -> dict[str, Any]:
    """A run as the CLI's --json prints it (docs/json.md): named fields, not a dump of
    RunView, so a renamed attribute cannot silently change the output."""
    return {"id": run.id, "task": run.task, "preset": run.preset, "seed": run.seed,
            "status": run.status, "error": run.error, "config": run.config,
            "created_at": run.created_at, "updated_at": run.updated_at,
            "finished_at": run.finished_at}


def candidate_record(c: CandidateView) -> dict[str, Any]:
    """A candidate as `candidates --json` prints it (docs/json.md)."""
    return {"id": c.id, "run_id": c.run_id, "iteration": c.iteration, "index": c.index,
            "arm": c.arm, "role": c.role, "parent_id": c.parent_id, "status": c.status,
            "reason": c.reason, "score": c.score, "rescore": c.rescore, "flagged": c.flagged,
            "param_count": c.param_count, "duration_s": c.duration_s, "design": c.design,
            "sha256": c.sha256, "source": c.source, "logs": c.logs,
            "declaration": c.declaration, "created_at": c.created_at, "started_at": c.started_at,
            "finished_at": c.finished_at}


def run_summary(store: LineageStore, run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    iterations = store.iterations(run.id)
    done = [it for it in iterations if it.arm == "lm" and it.stage == "done"]
    selected_ids = {it.selected_id for it in iterations if it.arm == "lm" and it.selected_id}
    scores = [c.score for c in store.candidates(run.id, arm="lm")
              if c.id in selected_ids and c.score is not None]
    best = None
    if scores:
        best = min(scores) if direction(run.task) == "min" else max(scores)
    return {**run_record(run), "iterations_done": len(done), "best_score": best}


def run_detail(store: LineageStore, run_id: str) -> dict[str, Any]:
    """A run with its iteration rows and arm outcomes, as `show --json` prints it."""
    run = store.get_run(run_id)
    return detail_of(run, store.iterations(run.id), store.candidates(run.id))


def detail_of(run: RunView, iterations: Sequence[IterationView],
              candidates: Sequence[CandidateView]) -> dict[str, Any]:
    """`run_detail` from rows already read (the web view draws its figures from them too)."""
    return {**run_record(run), "iterations": iteration_rows(iterations, candidates),
            "arms": arm_outcomes(iterations, candidates)}


def source_diff(before: CandidateView | None, after: CandidateView) -> str:
    """The unified diff of `after`'s source against `before`'s ("" when unchanged or
    when there is nothing before it)."""
    if before is None or before.source == after.source:
        return ""
    return "".join(difflib.unified_diff(
        before.source.splitlines(keepends=True), after.source.splitlines(keepends=True),
        fromfile=f"candidate {before.id}", tofile=f"candidate {after.id}"))


def lineage_steps(chain: Sequence[CandidateView]) -> list[dict[str, Any]]:
    """The steps of a lineage (seed first) as `lineage --json` prints them, each with the
    diff of its source against the previous step's."""
    return [{"id": c.id, "run_id": c.run_id, "iteration": c.iteration, "index": c.index,
             "arm": c.arm, "role": c.role, "parent_id": c.parent_id, "status": c.status,
             "score": c.score, "design": c.design, "sha256": c.sha256,
             "diff": source_diff(chain[i - 1] if i else None, c)}
            for i, c in enumerate(chain)]


def arm_outcomes(iterations: Sequence[IterationView],
                 candidates: Sequence[CandidateView]) -> dict[str, dict[str, Any]]:
    """Per arm: the seed's score (iteration 0's incumbent), the score of the source the
    last finished iteration selected, and how many iterations finished."""
    by_id = {c.id: c for c in candidates}
    out: dict[str, dict[str, Any]] = {}
    for arm in sorted({it.arm for it in iterations}, key=lambda a: (a != "lm", a)):
        rows = sorted((it for it in iterations if it.arm == arm), key=lambda it: it.index)
        done = [it for it in rows if it.stage == "done"]
        seed = by_id.get(rows[0].incumbent_id) if rows else None
        end = by_id.get(done[-1].selected_id) if done else None
        out[arm] = {"start": seed.score if seed else None, "end": end.score if end else None,
                    "iterations_done": len(done),
                    "end_params": end.param_count if end else None,
                    "end_design": end.design if end else None}
    return out


def arms_line(outcomes: dict[str, dict[str, Any]]) -> str:
    return "   ".join(f"{arm}: {fmt_score(o['start'])} -> {fmt_score(o['end'])} "
                      f"({o['iterations_done']} it.)" for arm, o in outcomes.items())
