"""The self-reprogramming loop (the paper's Algorithm 1), as Celery tasks.

One iteration, for the current source c:

    train      build the LM that c defines, train it on the refinement corpus  (trainer queue)
    generate   give the trained LM c, sample n candidates c_1..c_n              (trainer queue)
    evaluate   score c and every c_i the same way, one sandbox each, as a chord (sandbox queue)
    select     c <- the best c_i, unless none beats c (keep-original rule)      (coordinator)

Each stage is a small coordinator task that records what happened in the lineage DB and
dispatches the next stage, so a run can be resumed from the DB after any crash
(`resume`). Embedded, Celery runs the very same tasks eagerly in-process.

When the LM programs another network (a vision task), the LM is the seed LM, trained
once, and c is the network's source. A second "random" arm can run beside it: the same
search with the LM replaced by random single-parameter refinements (the control).
"""
from __future__ import annotations

import functools
import logging
import random
import sys
import time
from typing import Any, Callable

from celery import chain, chord

from pipeline import events, refinement
from pipeline import tokenizer as tk
from pipeline.jobs import RunContext
from pipeline.settings import RunConfig, Settings
from pipeline.store import CandidateView, LineageStore
from pipeline.worker import app, queue_for, run_job
from pipeline import worker
from sandbox.policy import check as policy_check
from sandbox.schema import Result

log = logging.getLogger(__name__)

# A sandbox result's status -> the candidate's final state in the lineage DB.
CANDIDATE_STATUS = {"ok": "evaluated", "invalid": "invalid", "timeout": "timeout", "oom": "oom",
                    "rejected": "rejected", "crashed": "invalid"}
ACTIVE = ("pending", "running")

_stores: dict[str, LineageStore] = {}


def store_for(settings: Settings) -> LineageStore:
    if settings.database_url not in _stores:
        _stores[settings.database_url] = LineageStore(settings.database_url)
    return _stores[settings.database_url]


def _context(run_id: str) -> tuple[LineageStore, RunContext]:
    s = worker.settings()
    store = store_for(s)
    run = store.get_run(run_id)
    return store, RunContext(run.id, RunConfig.from_dict(run.config), s)


# --------------------------------------------------------------------------- selection
def select(incumbent: CandidateView, candidates: list[CandidateView],
           direction: str) -> tuple[CandidateView, str]:
    """c <- argbest score(c_i); keep c unless a candidate is strictly better.

    Only evaluated candidates compete (errors discard a candidate). Ties keep the
    incumbent; among equal candidates the lowest index wins, so selection is repeatable.
    """
    scored = [c for c in candidates if c.status == "evaluated" and c.score is not None]
    if not scored:
        return incumbent, "kept"
    sign = 1 if direction == "min" else -1
    best = min(scored, key=lambda c: (sign * c.score, c.index))
    if incumbent.status != "evaluated" or incumbent.score is None:
        return best, "replaced"
    return (best, "replaced") if sign * best.score < sign * incumbent.score else (incumbent, "kept")


# --------------------------------------------------------------------------- tasks
def coordinator_task(fn: Callable) -> Any:
    """A loop stage: on an unexpected error the run is marked failed, with the reason."""
    @app.task(name=f"selfprog.loop.{fn.__name__}", acks_late=True, reject_on_worker_lost=True)
    @functools.wraps(fn)
    def task(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as e:
            run_id = kw.get("run_id")
            log.exception("stage %s of run %s failed", fn.__name__, run_id)
            if run_id:
                store_for(worker.settings()).set_run_status(
                    run_id, "failed", error=f"{fn.__name__}: {type(e).__name__}: {e}"[:2000])
                events.emit(run_id, "failed", error=str(e)[:500])
            raise
    return task


@coordinator_task
def start(*, run_id: str) -> None:
    """Prepare the run's corpus, tokenizer and data, then start every arm at iteration 0."""
    store, ctx = _context(run_id)
    if store.get_run(run_id).status not in ("pending", "running"):
        return
    store.set_run_status(run_id, "running")
    events.emit(run_id, "stage", iteration=0, stage="preparing", arm="lm")
    ctx.prepare()
    for arm in ctx.config.arms:
        begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=0, arm=arm))


@coordinator_task
def begin_iteration(*, run_id: str, index: int, arm: str = "lm") -> None:
    store, ctx = _context(run_id)
    if store.get_run(run_id).status != "running":
        return
    if index >= ctx.config.iterations:
        _finish_arm(store, ctx, arm)
        return
    if index == 0:
        source, parent_id = ctx.seed_source(), None
    else:
        prev = store.get_iteration(run_id, index - 1, arm)
        winner = store.get_candidate(prev.selected_id)
        source, parent_id = winner.source, winner.id
    it = store.ensure_iteration(run_id, index, source_in=source, arm=arm)
    if it.stage != "pending":
        return   # a duplicate delivery: this iteration is already under way
    incumbent = store.ensure_candidate(
        run_id, index, 0, role="incumbent", source=source, parent_id=parent_id,
        design=refinement.parse(source, ctx.target), arm=arm)
    needs_lm = arm == "lm" and (ctx.config.task == "self" or not _lm_weights(ctx, index).exists())
    stage = "training" if needs_lm else "generating"
    store.update_iteration(run_id, index, arm, stage=stage, incumbent_id=incumbent.id)
    _dispatch(store, ctx, index, arm, stage)


def _lm_weights(ctx: RunContext, index: int):
    return ctx.lm_dir(index) / "weights.safetensors"


def _dispatch(store: LineageStore, ctx: RunContext, index: int, arm: str, stage: str) -> None:
    """Start `stage` of an iteration. Called for new iterations and by `resume`."""
    run_id = ctx.run_id
    it = store.get_iteration(run_id, index, arm)
    events.emit(run_id, "stage", iteration=index, stage=stage, arm=arm)
    kw = dict(run_id=run_id, index=index, arm=arm)
    if stage == "training":
        job = ctx.train_job(index, it.source_in)
        chain(run_job.si(_wire(job), str(ctx.lm_dir(index))).set(queue=queue_for(job)),
              after_training.s(**kw)).apply_async()
    elif stage == "generating" and arm == "lm":
        job = ctx.generate_job(index, it.source_in)
        chain(run_job.si(_wire(job), str(ctx.dir / "generate")).set(queue=queue_for(job)),
              after_generation.s(**kw)).apply_async()
    elif stage == "generating":   # the control arm: random refinements instead of the LM
        _add_candidates(store, ctx, index, arm, _random_refinements(ctx, it.source_in, index))
        store.update_iteration(run_id, index, arm, stage="evaluating")
        _dispatch(store, ctx, index, arm, "evaluating")
    elif stage == "evaluating":
        todo = [c for c in store.candidates(run_id, iteration=index, arm=arm) if c.status in ACTIVE]
        store.mark_running([c.id for c in todo])
        jobs = [ctx.evaluate_job(arm, index, c.index, c.source) for c in todo]
        header = [run_job.si(_wire(j), str(ctx.dir / "evaluate")).set(queue=queue_for(j)) for j in jobs]
        body = finish_iteration.s(candidate_ids=[c.id for c in todo], **kw)
        if header:
            chord(header)(body)
        else:
            body.apply_async(args=([],))
    elif stage == "selecting":
        finish_iteration.apply_async(args=([],), kwargs=dict(candidate_ids=[], **kw))


def _wire(job) -> dict:
    """A job as it travels in a task message (plain JSON data)."""
    from dataclasses import asdict
    return asdict(job)


@coordinator_task
def after_training(result: dict, *, run_id: str, index: int, arm: str = "lm") -> None:
    store, ctx = _context(run_id)
    res = Result.from_dict(result)
    store.update_iteration(run_id, index, arm, lm_losses=res.losses, lm_seconds=res.duration_s)
    store.add_curve(run_id, "lm_loss", res.losses, iteration=index)
    if res.status != "ok":
        raise RuntimeError(f"the LM defined by the current source could not be trained "
                           f"({res.status}: {res.reason})")
    events.emit(run_id, "lm_trained", iteration=index, arm=arm, steps=len(res.losses),
                final_loss=res.losses[-1] if res.losses else None, seconds=res.duration_s)
    if store.get_run(run_id).status != "running":
        return
    store.update_iteration(run_id, index, arm, stage="generating")
    _dispatch(store, ctx, index, arm, "generating")


@coordinator_task
def after_generation(result: dict, *, run_id: str, index: int, arm: str = "lm") -> None:
    store, ctx = _context(run_id)
    res = Result.from_dict(result)
    store.update_iteration(run_id, index, arm, gen_seconds=res.duration_s)
    if res.status == "ok":
        sources = [tk.decode(ctx.tokenizer, ids) for ids in res.samples]
    else:  # no candidates this time; the incumbent is still scored and kept
        log.warning("generation failed in run %s iteration %d: %s", run_id, index, res.reason)
        events.emit(run_id, "generation_failed", iteration=index, arm=arm, reason=res.reason)
        sources = []
    _add_candidates(store, ctx, index, arm, sources)
    if store.get_run(run_id).status != "running":
        return
    store.update_iteration(run_id, index, arm, stage="evaluating")
    _dispatch(store, ctx, index, arm, "evaluating")


def _add_candidates(store: LineageStore, ctx: RunContext, index: int, arm: str,
                    sources: list[str]) -> None:
    """One row per candidate before anything runs; the policy gate's verdict is recorded."""
    incumbent = store.get_candidate(store.get_iteration(ctx.run_id, index, arm).incumbent_id)
    for i, source in enumerate(sources, start=1):
        verdict = policy_check(source)
        store.ensure_candidate(
            ctx.run_id, index, i, role="candidate", source=source, parent_id=incumbent.id,
            design=refinement.parse(source, ctx.target), arm=arm,
            status="pending" if verdict.ok else "rejected",
            reason="" if verdict.ok else f"{verdict.rule}: {verdict.detail}")


def _random_refinements(ctx: RunContext, source: str, index: int) -> list[str]:
    params = refinement.parse(source, ctx.target)
    design = refinement.design_from_params(params, ctx.config, ctx.target)
    out = []
    for i in range(ctx.config.candidates):
        rng = random.Random(f"{ctx.config.seed}-{index}-{i}")
        out.append(refinement.render(refinement.refine(design, rng, ctx.target), ctx.target))
    return out


@coordinator_task
def finish_iteration(results: list[dict], *, run_id: str, index: int, arm: str = "lm",
                     candidate_ids: list[int]) -> None:
    """Record every evaluation, apply the selection rule, start the next iteration."""
    store, ctx = _context(run_id)
    started = time.monotonic()
    for cid, raw in zip(candidate_ids, results):
        res = Result.from_dict(raw)
        status = CANDIDATE_STATUS[res.status]
        reason = res.reason if res.status != "crashed" else f"sandbox crashed: {res.reason}"
        if store.record_result(cid, status=status, reason=reason, score=res.score,
                               param_count=res.param_count, duration_s=res.duration_s,
                               logs=res.logs, losses=res.losses):
            c = store.get_candidate(cid)
            events.emit(run_id, "candidate", iteration=index, index=c.index, arm=arm,
                        role=c.role, status=status, score=res.score, reason=reason[:200])
    it = store.get_iteration(run_id, index, arm)
    if it.stage == "done":
        return   # a duplicate delivery
    rows = store.candidates(run_id, iteration=index, arm=arm)
    incumbent = next(c for c in rows if c.role == "incumbent")
    winner, decision = select(incumbent, [c for c in rows if c.role == "candidate"], ctx.direction)
    store.update_iteration(run_id, index, arm, selected_id=winner.id, decision=decision,
                           stage="done", eval_seconds=sum(c.duration_s or 0 for c in rows))
    events.emit(run_id, "iteration", iteration=index, arm=arm, decision=decision,
                score=winner.score, design=winner.design, candidate_id=winner.id)
    log.debug("selection took %.3fs", time.monotonic() - started)
    begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=index + 1, arm=arm))


def _finish_arm(store: LineageStore, ctx: RunContext, arm: str) -> None:
    done = all(
        (it := store.get_iteration(ctx.run_id, ctx.config.iterations - 1, a)) is not None
        and it.stage == "done" for a in ctx.config.arms)
    if done and store.get_run(ctx.run_id).status == "running":
        store.set_run_status(ctx.run_id, "completed")
        events.emit(ctx.run_id, "done", status="completed")


# --------------------------------------------------------------------------- entry points
def launch(settings: Settings, config: RunConfig,
           progress: Callable[[str, dict], None] | None = None, *, detach: bool = False) -> str:
    """Create a run and execute it: in-process when embedded, else on the workers."""
    worker.configure(settings)
    store = store_for(settings)
    run_id = store.create_run(config=config.to_dict(), task=config.task,
                              preset=config.preset, seed=config.seed)
    _execute(settings, run_id, progress, detach,
             lambda: start.apply_async(kwargs=dict(run_id=run_id)))
    return run_id


def resume(settings: Settings, run_id: str,
           progress: Callable[[str, dict], None] | None = None, *, detach: bool = False) -> str:
    """Carry on a run from what the lineage DB says, after a crash or a cancel-free stop.

    Every unfinished iteration is restarted at its recorded stage; candidates that
    already reached a final state are not run again.
    """
    worker.configure(settings)
    store = store_for(settings)
    run = store.get_run(run_id)
    run_id = run.id
    if run.status == "completed":
        return run_id
    store.set_run_status(run_id, "running")
    ctx = RunContext(run_id, RunConfig.from_dict(run.config), settings)

    def go() -> None:
        if not (ctx.dir / "prepared").exists():
            start.apply_async(kwargs=dict(run_id=run_id))
            return
        for arm in ctx.config.arms:
            its = store.iterations(run_id, arm=arm)
            if not its:
                begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=0, arm=arm))
            elif its[-1].stage == "done":
                begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=its[-1].index + 1, arm=arm))
            elif its[-1].stage == "pending":
                store.update_iteration(run_id, its[-1].index, arm, stage="pending")
                begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=its[-1].index, arm=arm))
            else:
                stage = its[-1].stage
                if stage == "generating" and arm == "lm" and ctx.config.task == "self" \
                        and not (ctx.lm_dir(its[-1].index) / "weights.safetensors").exists():
                    stage = "training"
                _dispatch(store, ctx, its[-1].index, arm, stage)

    _execute(settings, run_id, progress, detach, go)
    return run_id


def cancel(settings: Settings, run_id: str) -> int:
    """Stop a run: no new stage starts, and unfinished candidates end as cancelled."""
    store = store_for(settings)
    run = store.get_run(run_id)
    store.set_run_status(run.id, "cancelled")
    n = store.cancel_pending(run.id)
    events.emit(run.id, "done", status="cancelled")
    return n


def _execute(settings: Settings, run_id: str, progress, detach: bool, kick: Callable[[], None]) -> None:
    events.subscribe(run_id, progress)
    try:
        if settings.embedded:
            # Eager Celery runs each next stage inside the previous one: a deep stack.
            sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
            kick()
        else:
            kick()
            if not detach:
                attach(settings, run_id, progress)
    finally:
        events.unsubscribe(run_id)


def attach(settings: Settings, run_id: str, progress=None, poll_s: float = 1.0) -> str:
    """Follow a run on the workers until it ends; forward its live events."""
    import json

    import redis

    store = store_for(settings)
    pubsub = redis.Redis.from_url(settings.broker_url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events.channel(run_id))
    try:
        while True:
            msg = pubsub.get_message(timeout=poll_s)
            if msg and progress:
                data = json.loads(msg["data"])
                progress(data.pop("event"), data)
            status = store.get_run(run_id).status
            if status in ("completed", "failed", "cancelled"):
                return status
    finally:
        pubsub.close()
