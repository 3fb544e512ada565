"""Summaries of runs, shared by the CLI and the plots: one row per iteration, a run's
best score, each arm's start and end, a candidate's lineage with its diffs, and the short
text forms of scores and designs (a design as its family names it)."""
from __future__ import annotations

import difflib
from datetime import datetime
from typing import Any, Sequence

from pipeline.families import get_family, short_names
from pipeline.store import CandidateView, IterationView, LineageStore, RunView


def direction(task: str) -> str:
    """"min" when the task's score is a loss, "max" for an accuracy (pipeline/catalog.py).
    A task this installation does not know (an old run's) reads as an accuracy."""
    from pipeline.catalog import get_task
    try:
        return get_task(task).direction
    except (ValueError, LookupError):
        return "max"


def task_family(task: str) -> Any | None:
    """The family of the task's sources (pipeline/families/), or None for a task this
    installation does not know (an old run's): its designs then print by their keys."""
    from pipeline.catalog import get_task
    try:
        return get_family(get_task(task).family)
    except (ValueError, LookupError):
        return None


def fmt_score(score: float | None) -> str:
    if score is None:
        return "-"
    return f"{score:.4f}" if abs(score) < 1e4 else f"{score:.4g}"


def fmt_time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def fmt_design(design: dict[str, Any] | None, family: Any | None = None) -> str:
    """`key=value ...`, with the family's short names (task_family) where it has them."""
    if not design:
        return "-"
    names = short_names(family)
    parts = []
    for key, value in design.items():
        if isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{names.get(key, key)}={value}")
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
            # the lineage proposer's fine-tuning (pipeline/proposers/lineage.py), and the
            # share of samples repeating a move that improved before (any arm)
            "finetune_steps": len(it.finetune_losses) if it.finetune_losses else None,
            "finetune_loss": _last(it.finetune_losses),
            "finetune_pairs": it.finetune_pairs,
            "repeat_rate": it.repeat_rate,
        })
    return rows


def _last(values) -> float | None:
    return next((v for v in reversed(values or []) if v is not None), None)


def arm_order(arms) -> list[str]:
    """Arms in the proposer registry's order (lm, random, lineage, then any other)."""
    from pipeline.proposers import names
    known = names()
    return sorted(set(arms), key=lambda a: (known.index(a) if a in known else len(known), a))


def best_so_far(candidates: Sequence[CandidateView], arm: str, better: str) -> list[tuple[int, float]]:
    """(evaluations spent, best score seen) after each of an arm's candidate rows, in the
    order the loop made them (iteration, then index). Every row is spent budget: one the
    gate rejected or that ended invalid was a draw all the same, and an iteration's
    incumbent is evaluated in every iteration."""
    pick = min if better == "min" else max
    out: list[tuple[int, float]] = []
    best = None
    rows = sorted((c for c in candidates if c.arm == arm), key=lambda c: (c.iteration, c.index))
    for n, c in enumerate(rows, start=1):
        if c.score is not None and c.status == "evaluated" and not c.flagged:
            best = c.score if best is None else pick(best, c.score)
        if best is not None:
            out.append((n, best))
    return out


def run_record(run: RunView) -> dict[str, Any]:
    """A run as the CLI's --json prints it (docs/json.md): named fields, not a dump of
    RunView, so a renamed attribute cannot silently change the output."""
    return {"id": run.id, "task": run.task, "preset": run.preset, "seed": run.seed,
            "status": run.status, "error": run.error, "config": run.config,
            "created_at": run.created_at, "updated_at": run.updated_at,
            "finished_at": run.finished_at}


def candidate_record(c: CandidateView, evaluations: dict | None = None) -> dict[str, Any]:
    """A candidate as `candidates --json` prints it (docs/json.md)."""
    return {"id": c.id, "run_id": c.run_id, "iteration": c.iteration, "index": c.index,
            "arm": c.arm, "role": c.role, "parent_id": c.parent_id, "status": c.status,
            "reason": c.reason, "score": c.score, "rescore": c.rescore, "flagged": c.flagged,
            "param_count": c.param_count, "duration_s": c.duration_s, "design": c.design,
            "sha256": c.sha256, "source": c.source, "logs": c.logs,
            "declaration": c.declaration, "created_at": c.created_at, "started_at": c.started_at,
            "finished_at": c.finished_at, "reused": c.reused,
            "evaluation": provenance(c, evaluations or {})}


def provenance(c: CandidateView, evaluations: dict) -> dict[str, Any] | None:
    """Where a candidate's score came from and what its sandbox cost: the evaluation's
    key and parts (pipeline/evaluations.py), the backend identity and host the worker
    used, wall and CPU seconds and peak resident memory; None before it was evaluated."""
    e = evaluations.get(c.evaluation_key) if c.evaluation_key else None
    if e is None:
        return None
    return {"key": e.key, "parts": e.parts, "backend": e.backend, "host": e.host,
            "wall_s": e.wall_s, "cpu_s": e.cpu_s, "peak_rss_mb": e.peak_rss_mb,
            "first_run_id": e.run_id, "reuses": e.reuses}


def evaluation_summary(candidates: Sequence[CandidateView], evaluations: dict) -> dict[str, Any]:
    """How a run's candidates were scored: in a sandbox of their own or from a stored
    evaluation (`reused`), and what the sandboxes cost and what reuse saved."""
    ran = [c for c in candidates if c.evaluation_key and not c.reused]
    reused = [c for c in candidates if c.reused]

    def total(cs, field):
        vals = [getattr(evaluations[c.evaluation_key], field) for c in cs
                if c.evaluation_key in evaluations]
        vals = [v for v in vals if v is not None]
        return round(sum(vals), 3) if vals else None
    return {"sandbox": len(ran), "reused": len(reused),
            "sandbox_wall_s": total(ran, "wall_s"), "sandbox_cpu_s": total(ran, "cpu_s"),
            "saved_wall_s": total(reused, "wall_s")}


def run_summary(store: LineageStore, run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    iterations = store.iterations(run.id)
    first = (run.config.get("arms") or ["lm"])[0]   # the run's main arm
    done = [it for it in iterations if it.arm == first and it.stage == "done"]
    selected_ids = {it.selected_id for it in iterations if it.arm == first and it.selected_id}
    scores = [c.score for c in store.candidates(run.id, arm=first)
              if c.id in selected_ids and c.score is not None]
    best = None
    if scores:
        best = min(scores) if direction(run.task) == "min" else max(scores)
    return {**run_record(run), "iterations_done": len(done), "best_score": best}


def run_detail(store: LineageStore, run_id: str) -> dict[str, Any]:
    """A run with its iteration rows, arm outcomes and evaluations, as `show --json`
    prints it."""
    run = store.get_run(run_id)
    return detail_of(run, store.iterations(run.id), store.candidates(run.id, texts=False),
                     store.evaluations(run.id))


def detail_of(run: RunView, iterations: Sequence[IterationView],
              candidates: Sequence[CandidateView], evaluations: dict) -> dict[str, Any]:
    """`run_detail` from rows already read (the web view draws its figures from them too)."""
    return {**run_record(run), "iterations": iteration_rows(iterations, candidates),
            "arms": arm_outcomes(iterations, candidates),
            "evaluations": evaluation_summary(candidates, evaluations)}


def source_diff(before: CandidateView | None, after: CandidateView) -> str:
    """The unified diff of `after`'s source against `before`'s ("" when unchanged or
    when there is nothing before it)."""
    if before is None or before.source == after.source:
        return ""
    return "".join(difflib.unified_diff(
        before.source.splitlines(keepends=True), after.source.splitlines(keepends=True),
        fromfile=f"candidate {before.id}", tofile=f"candidate {after.id}"))


def arm_outcomes(iterations: Sequence[IterationView],
                 candidates: Sequence[CandidateView]) -> dict[str, dict[str, Any]]:
    """Per arm: the seed's score (iteration 0's incumbent), the score of the source the
    last finished iteration selected, and how many iterations finished."""
    by_id = {c.id: c for c in candidates}
    out: dict[str, dict[str, Any]] = {}
    for arm in arm_order(it.arm for it in iterations):
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


def lineage_record(chain: Sequence[CandidateView],
                   evaluations: dict | None = None) -> list[dict[str, Any]]:
    """A candidate's ancestry, seed first (LineageStore.lineage), as `lineage --json`
    prints it (docs/json.md): per step the candidate, a unified diff of its source
    against the previous step's ("" for the seed, and for a step that copies its
    parent, as an incumbent does), whether its outcome was reused and its evaluation's
    provenance (`evaluations`: LineageStore.evaluations of the chain's runs)."""
    return [{"id": c.id, "run_id": c.run_id, "iteration": c.iteration, "index": c.index,
             "arm": c.arm, "role": c.role, "parent_id": c.parent_id, "status": c.status,
             "score": c.score, "design": c.design, "sha256": c.sha256,
             "diff": source_diff(chain[i - 1] if i else None, c),
             "reused": c.reused, "evaluation": provenance(c, evaluations or {})}
            for i, c in enumerate(chain)]


def lineage_of(store: LineageStore, candidate_id: int) -> tuple[list[CandidateView], list[dict[str, Any]]]:
    """A candidate's ancestry (LineageStore.lineage) and its `lineage_record`, with the
    evaluations of every run the chain passes through."""
    chain = store.lineage(candidate_id)
    evaluations: dict = {}
    for run_id in {c.run_id for c in chain}:
        evaluations.update(store.evaluations(run_id))
    return chain, lineage_record(chain, evaluations)
