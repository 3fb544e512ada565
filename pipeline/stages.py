"""The self-reprogramming loop (the paper's Algorithm 1), as Celery tasks.

One iteration, for the current source c:

    train      build the LM that c defines, train it on the refinement corpus  (trainer queue)
    generate   give the trained LM c, sample n candidates c_1..c_n              (trainer queue)
    evaluate   score c and every c_i the same way, one sandbox each, as a chord (sandbox queue)
    select     c <- the best c_i, unless none beats c (keep-original rule)      (coordinator)

Each stage is a small coordinator task that records what happened in the lineage DB and
dispatches the next stage, so a run can be resumed from the DB after any crash
(`resume` in pipeline/runs.py). Embedded, Celery runs the very same tasks eagerly
in-process. `TRANSITIONS` below is the stage machine of one iteration, as data.

Distributed, any message may be delivered twice (late acks: a worker that dies is
replaced and its message comes back). So every stage change is a compare-and-set in
the DB (`LineageStore.advance_stage`): of two deliveries exactly one moves the iteration
on and dispatches the next stage; the other returns. A *redelivered* message whose
compare-and-set already happened dispatches the stage again, because its first delivery
may have died between the DB write and the dispatch; the duplicate work that can cause is
absorbed the same way (one row per candidate, a result recorded once).

When the LM programs another network (a vision task), the LM is the seed LM, trained
once, and c is the network's source. Several arms can run side by side, each the same
search with another proposer writing the candidates (pipeline/proposers/: `lm`, the
paper's; `random`, the control; `lineage`, the LM fine-tuned on the run's own lineage).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from celery import chain, chord, current_task

from pipeline import celery_app, events, refinement
from pipeline.celery_app import app
from pipeline.jobs import RunContext
from pipeline.proposers import Request, get_proposer
from pipeline.proposers.history import edits as lineage_edits
from pipeline.proposers.history import improving_moves, repeat_rate
from pipeline.sandbox_task import queue_for, run_job
from pipeline.selection import select
from pipeline.settings import RunConfig
from pipeline.store import OPEN_STATUSES, RUN_ACTIVE_STATUSES, LineageStore, store_for
from sandbox.policy import check as policy_check
from sandbox.schema import Job, Result

log = logging.getLogger(__name__)

# A sandbox result's status -> the candidate's final state in the lineage DB.
CANDIDATE_STATUS = {"ok": "evaluated", "invalid": "invalid", "timeout": "timeout", "oom": "oom",
                    "rejected": "rejected", "crashed": "invalid"}

# The stage machine of one iteration (stage names: pipeline/store/models.py), as data:
# (from, to) -> the task that makes the move. Every stage change goes through `_advance`,
# which refuses a move not listed here; each move is a compare-and-set in the DB.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("pending", "training"): "begin_iteration",       # the LM defined by c must be trained
    ("pending", "generating"): "begin_iteration",     # the run's one LM is trained already
    ("training", "generating"): "after_training",
    ("generating", "evaluating"): "after_generation",
    ("generating", "training"): "recover",            # the trained LM's weights are gone
    ("evaluating", "selecting"): "finish_iteration",  # a would-be winner is re-scored
    ("evaluating", "done"): "finish_iteration",
    ("selecting", "done"): "finish_iteration",        # after confirm_winner
}

# Whether the stage task now running is a redelivered message (see the module docstring).
_redelivered: contextvars.ContextVar[bool] = contextvars.ContextVar("selfprog_redelivered",
                                                                    default=False)


def _advance(store: LineageStore, run_id: str, index: int, arm: str,
             from_stage: str | tuple[str, ...], to_stage: str, **fields: Any) -> bool:
    """`store.advance_stage`, for a move that `TRANSITIONS` allows."""
    for stage in (from_stage,) if isinstance(from_stage, str) else from_stage:
        if (stage, to_stage) not in TRANSITIONS:
            raise RuntimeError(f"no stage transition {stage} -> {to_stage}")
    return store.advance_stage(run_id, index, arm, from_stage, to_stage, **fields)


def _context(run_id: str) -> tuple[LineageStore, RunContext]:
    s = celery_app.settings()
    store = store_for(s.database_url)
    run = store.get_run(run_id)
    return store, RunContext(run.id, RunConfig.from_dict(run.config), s)


def _self_programming(ctx: RunContext) -> bool:
    return ctx.task.self_programming


# --------------------------------------------------------------------------- tasks
@contextlib.contextmanager
def redelivery(flag: bool = True) -> Iterator[None]:
    """Run stage functions (`stage.run.__wrapped__`, outside the task wrapper) as if
    their message were, or were not, a redelivery. For tests and `resume`."""
    token = _redelivered.set(flag)
    try:
        yield
    finally:
        _redelivered.reset(token)


def _is_redelivery() -> bool:
    try:
        info = current_task.request.delivery_info or {}
    except Exception:
        return False
    return bool(info.get("redelivered"))


def _moved(won: bool, store: LineageStore, run_id: str, index: int, arm: str, stage: str) -> bool:
    """Whether to dispatch `stage` after a compare-and-set into it: when this delivery
    won it, or when this is a redelivery and the iteration is still in that stage (the
    first delivery may have died right after the write)."""
    if won:
        return True
    if not _redelivered.get():
        return False
    it = store.get_iteration(run_id, index, arm)
    return it is not None and it.stage == stage


def coordinator_task(fn: Callable) -> Any:
    """A loop stage: on an unexpected error the run is marked failed, with the reason."""
    @app.task(name=f"selfprog.loop.{fn.__name__}", acks_late=True, reject_on_worker_lost=True)
    @functools.wraps(fn)
    def task(*args: Any, **kw: Any) -> Any:
        # Per message: an eager stage run inside another must not inherit its flag.
        token = _redelivered.set(_is_redelivery())
        try:
            return fn(*args, **kw)
        except Exception as e:
            # Embedded, stages run nested inside each other: the innermost one that
            # failed records and logs it; the enclosing ones only pass it on.
            if getattr(e, "_selfprog_recorded", False):
                raise
            e._selfprog_recorded = True
            run_id = kw.get("run_id")
            log.exception("stage %s of run %s failed", fn.__name__, run_id)
            # Only a run still under way fails: a cancelled run stays cancelled (its
            # stopped jobs end in errors that are not the run's failure).
            if run_id and store_for(celery_app.settings().database_url).set_run_status(
                    run_id, "failed", error=f"{fn.__name__}: {type(e).__name__}: {e}"[:2000],
                    only_from=RUN_ACTIVE_STATUSES):
                events.emit(run_id, "failed", error=str(e)[:500])
            raise
        finally:
            _redelivered.reset(token)
    return task


@coordinator_task
def start(*, run_id: str) -> None:
    """Prepare the run's corpus, tokenizer and data, then start every arm at iteration 0."""
    store, ctx = _context(run_id)
    if store.get_run(run_id).status not in RUN_ACTIVE_STATUSES:
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
    if it.stage != "pending" and not _redelivered.get():
        return   # a duplicate delivery: this iteration is already under way
    incumbent = store.ensure_candidate(
        run_id, index, 0, role="incumbent", source=source, parent_id=parent_id,
        design=refinement.parse(source, ctx.task), arm=arm)
    needs_lm = get_proposer(arm).USES_LM and (_self_programming(ctx)
                                              or not ctx.lm_weights(arm, index).exists())
    stage = "training" if needs_lm else "generating"
    won = _advance(store, run_id, index, arm, "pending", stage, incumbent_id=incumbent.id)
    if _moved(won, store, run_id, index, arm, stage):
        _dispatch(store, ctx, index, arm, stage)


def _dispatch(store: LineageStore, ctx: RunContext, index: int, arm: str, stage: str) -> None:
    """Start `stage` of an iteration. Called for new iterations and by `resume`."""
    run_id = ctx.run_id
    it = store.get_iteration(run_id, index, arm)
    events.emit(run_id, "stage", iteration=index, stage=stage, arm=arm)
    kw = dict(run_id=run_id, index=index, arm=arm)
    if stage == "training":
        job = ctx.train_job(arm, index, it.source_in)
        chain(_job_task(job, ctx.lm_dir(arm, index), **kw), after_training.s(**kw)).apply_async()
    elif stage == "generating":
        job = get_proposer(arm).job(_request(ctx, arm, index, it.source_in))
        if job is None:   # the proposer draws its sources itself (the control arm)
            after_generation.run.__wrapped__(None, **kw)
        else:
            chain(_job_task(job, ctx.arm_dir(arm) / "generate", **kw),
                  after_generation.s(**kw)).apply_async()
    elif stage == "evaluating":
        todo = [c for c in store.candidates(run_id, iteration=index, arm=arm) if c.status in OPEN_STATUSES]
        store.mark_running([c.id for c in todo])
        header, waiting = [], []
        for c in todo:
            task = _evaluation(store, ctx, c.id, ctx.evaluate_job(arm, index, c.index, c.source), **kw)
            if task is not None:     # None: its stored outcome is recorded already
                header.append(task)
                waiting.append(c.id)
        body = finish_iteration.s(candidate_ids=waiting, **kw).set(queue="coordinator")
        if header:
            chord(header)(body)
        else:
            body.apply_async(args=([],))
    elif stage == "selecting":   # the winner's re-score may have been lost: send it again
        finish_iteration.apply_async(args=([],), kwargs=dict(candidate_ids=[], recovering=True,
                                                             **kw))


def _job_task(job, out_dir: Path, *, run_id: str, index: int, arm: str):
    """The run_job task for one sandbox job of an iteration, on its job's queue. The run
    it names lets the worker relay LM losses and stop the job if the run is cancelled."""
    return run_job.si(_wire(job), str(out_dir),
                      run={"run_id": run_id, "iteration": index, "arm": arm}).set(queue=queue_for(job))


# --------------------------------------------------------------- the evaluation cache
# An evaluation is run once per key (pipeline/evaluations.py): the first candidate to
# claim a key runs its sandbox and stores the outcome (`record_evaluation`); a candidate
# whose key is done takes the stored outcome without a sandbox; one whose key another
# candidate is running waits for that outcome (`await_evaluation`). The would-be
# winner's re-score never comes this way: it always runs fresh.
REUSABLE = ("ok", "invalid", "rejected")   # outcomes that say something about the source
AWAIT_POLL_S = 1.0


def _evaluation(store: LineageStore, ctx: RunContext, candidate_id: int, job, *, run_id: str,
                index: int, arm: str):
    """The chord member that evaluates one candidate, or None when a stored outcome was
    recorded for it now. The claimant is the job id: a resumed run or a redelivered stage
    finds its own claim again."""
    from pipeline.evaluations import key_for
    key, parts = key_for(job, ctx.settings)
    ev = dict(key=key, claimant=job.job_id, parts=parts, run_id=run_id)
    if ctx.config.reuse_evaluations:
        state, row = store.claim_evaluation(key, parts=parts, claimant=job.job_id, run_id=run_id)
        if state == "done":
            _record(store, run_id, index, arm, candidate_id, stored_result(row, job.job_id),
                    key=key, reused=True)
            return None
        if state == "busy":
            return await_evaluation.si(job=_wire(job), out_dir=str(ctx.eval_dir(job)),
                                       run={"run_id": run_id, "iteration": index, "arm": arm},
                                       **ev).set(queue="coordinator")
    return chain(_job_task(job, ctx.eval_dir(job), run_id=run_id, index=index, arm=arm),
                 record_evaluation.s(**ev).set(queue="coordinator"))


def stored_result(row, job_id: str) -> Result:
    """A stored evaluation's outcome as the sandbox result it came from."""
    return Result(job_id=job_id, kind="evaluate", status=row.result_status, reason=row.reason,
                  score=row.score, param_count=row.param_count, duration_s=row.duration_s or 0.0,
                  logs=row.logs, losses=list(row.losses or []),
                  declaration=row.declaration).validate()


def _stored(store: LineageStore, res: Result, *, key: str, claimant: str, parts: dict,
            run_id: str) -> bool:
    status = res.status
    return store.complete_evaluation(
        key, claimant=claimant, parts=parts, status=status, reusable=status in REUSABLE,
        reason=res.reason, score=res.score, param_count=res.param_count,
        duration_s=res.duration_s, logs=res.logs, losses=res.losses,
        declaration=res.declaration, usage=res.usage, run_id=run_id)


@coordinator_task
def record_evaluation(result: dict, *, key: str, claimant: str, parts: dict,
                      run_id: str) -> dict:
    """Store a sandbox's outcome under its key (once: only the claimant completes it),
    then pass it on to the iteration's chord, with the key it was evaluated under."""
    store = store_for(celery_app.settings().database_url)
    _stored(store, Result.from_dict(result), key=key, claimant=claimant, parts=parts, run_id=run_id)
    return {"evaluation": key, "reused": False, "result": result}


@app.task(name="selfprog.loop.await_evaluation", bind=True, acks_late=True,
          reject_on_worker_lost=True, max_retries=None)
def await_evaluation(self, *, job: dict, out_dir: str, run: dict, key: str, claimant: str,
                     parts: dict, run_id: str) -> dict:
    """Wait for the evaluation another candidate runs under the same key and take its
    outcome; if that one was discarded or its claimant died, run it here. Polls by
    retrying (a coordinator slot is never held while waiting), or by sleeping when
    embedded (every stage runs in this one process)."""
    store = store_for(celery_app.settings().database_url)
    while True:
        state, row = store.claim_evaluation(key, parts=parts, claimant=claimant, run_id=run_id)
        if state == "done":
            return {"evaluation": key, "reused": True,
                    "result": stored_result(row, job["job_id"]).to_dict()}
        if state == "claimed":
            work = chain(run_job.si(job, out_dir, run=run).set(queue=queue_for(Job.from_dict(job))),
                         record_evaluation.s(key=key, claimant=claimant, parts=parts,
                                             run_id=run_id).set(queue="coordinator"))
            if self.request.is_eager:
                return work.apply().get()
            raise self.replace(work)
        if store.get_run(run_id).status != "running":
            return {"evaluation": key, "reused": False,
                    "result": Result(job_id=job["job_id"], kind="evaluate", status="crashed",
                                     reason="run stopped while waiting for the same evaluation"
                                     ).validate().to_dict()}
        if self.request.is_eager:
            time.sleep(AWAIT_POLL_S)
            continue
        raise self.retry(countdown=AWAIT_POLL_S)


def _record(store: LineageStore, run_id: str, index: int, arm: str, candidate_id: int,
            res: Result, *, key: str | None = None, reused: bool = False) -> None:
    """Record one candidate's evaluation (once; a duplicate changes nothing)."""
    status, reason = outcome(res)
    if store.record_result(candidate_id, status=status, reason=reason, score=res.score,
                           param_count=res.param_count, duration_s=res.duration_s,
                           logs=res.logs, losses=res.losses, declaration=res.declaration,
                           evaluation_key=key, reused=reused):
        c = store.get_candidate(candidate_id)
        events.emit(run_id, "candidate", iteration=index, index=c.index, arm=arm,
                    role=c.role, status=status, score=res.score, reason=reason[:200],
                    reused=reused)


def _wire(job) -> dict:
    """A job as it travels in a task message (plain JSON data)."""
    from dataclasses import asdict
    return asdict(job)


@coordinator_task
def after_training(result: dict, *, run_id: str, index: int, arm: str = "lm") -> None:
    store, ctx = _context(run_id)
    res = Result.from_dict(result)
    it = store.get_iteration(run_id, index, arm)
    if it is None or (it.stage != "training" and not _redelivered.get()):
        return   # a duplicate: this training result was recorded already
    if store.get_run(run_id).status != "running":
        return   # cancelled meanwhile (its training was stopped): nothing more to do
    if res.status != "ok":
        if it.stage != "training":
            return   # a re-run failed where the first run had succeeded: keep the first
        store.update_iteration(run_id, index, arm, lm_losses=res.losses, lm_seconds=res.duration_s)
        raise RuntimeError(f"the LM defined by the current source could not be trained "
                           f"({res.status}: {res.reason})")
    copy = res.lm_metrics or {}
    won = _advance(store, run_id, index, arm, "training", "generating",
                   lm_losses=res.losses, lm_seconds=res.duration_s,
                   lm_copy_accuracy=copy.get("copy_accuracy"), lm_p_intact=copy.get("p_intact"),
                   lm_stop=copy.get("stop"))
    # The run's lm_loss curves are the paper arm's (another arm's LM losses stay on its
    # iterations).
    if arm == "lm" and (won or (_redelivered.get() and not any(
            c.iteration == index for c in store.curves(run_id, "lm_loss")))):
        store.add_curve(run_id, "lm_loss", res.losses, iteration=index)
    if won:
        events.emit(run_id, "lm_trained", iteration=index, arm=arm, steps=len(res.losses),
                    final_loss=res.losses[-1] if res.losses else None, seconds=res.duration_s,
                    copy_accuracy=copy.get("copy_accuracy"), p_intact=copy.get("p_intact"),
                    stop=copy.get("stop"))
    if _moved(won, store, run_id, index, arm, "generating"):
        _dispatch(store, ctx, index, arm, "generating")


def _request(ctx: RunContext, arm: str, index: int, parent: str) -> Request:
    return Request(ctx=ctx, arm=arm, index=index, parent=parent,
                   n=ctx.config.candidates * ctx.config.sample_factor)


@coordinator_task
def after_generation(result: dict | None, *, run_id: str, index: int, arm: str = "lm") -> None:
    """Turn the proposer's samples into candidates. `result` is its generate job's
    (None for a proposer without a job)."""
    store, ctx = _context(run_id)
    res = Result.from_dict(result) if result is not None else None
    if store.get_run(run_id).status != "running":
        return
    parent = store.get_iteration(run_id, index, arm).source_in
    proposal = get_proposer(arm).propose(_request(ctx, arm, index, parent), res)
    samples = proposal.samples
    # Each sample is parsed once; the rates are of everything drawn, kept or not.
    designs = [refinement.parse(s, ctx.task) for s in samples]
    before = refinement.parse(parent, ctx.task)
    improving = improving_moves(ctx.family, lineage_edits(store, run_id, arm, index,
                                                          ctx.task.direction))
    rate = single_edit_rate(ctx.family, before, designs)
    keep = refinement.choose_distinct(ctx.family, before, designs, ctx.config.candidates)
    # The stage moves first: only the winner's samples become candidates (a duplicate
    # generation could have sampled differently).
    won = _advance(store, run_id, index, arm, "generating", "evaluating",
                   single_edit_rate=rate,
                   repeat_rate=repeat_rate(ctx.family, before, designs, improving),
                   **{k: v for k, v in proposal.metadata.items() if v is not None})
    if not _moved(won, store, run_id, index, arm, "evaluating"):
        return
    if res is None or res.status == "ok":
        events.emit(run_id, "generated", iteration=index, arm=arm, samples=len(samples),
                    single_edit_rate=rate, finetune_steps=len(proposal.metadata.get("finetune_losses") or []))
    else:  # no candidates this time; the incumbent is still scored and kept
        log.warning("generation failed in run %s iteration %d: %s", run_id, index, res.reason)
        events.emit(run_id, "generation_failed", iteration=index, arm=arm, reason=res.reason)
    _add_candidates(store, ctx, index, arm, [(samples[i], designs[i]) for i in keep])
    _dispatch(store, ctx, index, arm, "evaluating")


def single_edit_rate(family, parent: dict | None, designs: list[dict | None]) -> float | None:
    """The share of samples whose design differs from the parent's in exactly one
    parameter (an unparsable sample counts as not one edit); None without samples."""
    if not designs:
        return None
    return sum(refinement.edits(family, parent, d) == 1 for d in designs) / len(designs)


def _add_candidates(store: LineageStore, ctx: RunContext, index: int, arm: str,
                    chosen: list[tuple[str, dict | None]]) -> None:
    """One row per candidate (source, parsed design) before anything runs; the policy
    gate's verdict is recorded."""
    incumbent = store.get_candidate(store.get_iteration(ctx.run_id, index, arm).incumbent_id)
    for i, (source, design) in enumerate(chosen, start=1):
        status, reason = gate(source)
        store.ensure_candidate(
            ctx.run_id, index, i, role="candidate", source=source, parent_id=incumbent.id,
            design=design, arm=arm, status=status, reason=reason)


def gate(source: str) -> tuple[str, str]:
    """The policy gate's verdict on a candidate: ("pending", "") or ("rejected", rule)."""
    verdict = policy_check(source)
    return ("pending", "") if verdict.ok else ("rejected", f"{verdict.rule}: {verdict.detail}")


def outcome(res: Result) -> tuple[str, str]:
    """A sandbox result -> the candidate's (status, reason) as the lineage DB records it.
    The score is `res.score`: computed on the trusted side (a vision accuracy) or by
    harness code from a declaration (the self task), sandbox/runner.py."""
    status = CANDIDATE_STATUS[res.status]
    reason = res.reason if res.status != "crashed" else f"sandbox crashed: {res.reason}"
    return status, reason


@coordinator_task
def finish_iteration(results: list[dict], *, run_id: str, index: int, arm: str = "lm",
                     candidate_ids: list[int], recovering: bool = False) -> None:
    """Record every evaluation, apply the selection rule, start the next iteration.

    A would-be new winner is re-scored first (confirm_winner comes back here). That job
    is sent by the delivery that moves the iteration to `selecting`, and again only by
    a redelivery or by `recover` (`recovering`), whose first sender may have died."""
    store, ctx = _context(run_id)
    started = time.monotonic()
    if len(results) != len(candidate_ids):
        raise RuntimeError(f"{len(results)} evaluation results for {len(candidate_ids)} candidates")
    for cid, raw in zip(candidate_ids, results):
        if "evaluation" in raw:     # record_evaluation / await_evaluation
            _record(store, run_id, index, arm, cid, Result.from_dict(raw["result"]),
                    key=raw["evaluation"], reused=bool(raw["reused"]))
        else:                       # a bare sandbox result (a chord sent before the cache)
            _record(store, run_id, index, arm, cid, Result.from_dict(raw))
    if store.get_run(run_id).status != "running":
        return   # cancelled (or failed) meanwhile: no selection, no next iteration
    rows = store.candidates(run_id, iteration=index, arm=arm)
    incumbent = next(c for c in rows if c.role == "incumbent")
    contenders = [c for c in rows if c.role == "candidate" and not c.flagged]
    winner, decision = select(incumbent, contenders,
                              ctx.task.direction)
    if decision == "replaced" and winner.rescore is None:
        # Reward-hacking guard: a winner's score is trusted only once a second, fresh
        # sandbox reproduces it. confirm_winner records the verdict and comes back here.
        won = _advance(store, run_id, index, arm, "evaluating", "selecting")
        if not (won or recovering or _redelivered.get()):
            return   # a duplicate delivery: the re-score is on its way already
        job = ctx.evaluate_job(arm, index, winner.index, winner.source)
        job = dataclasses.replace(job, job_id=job.job_id + ".rescore")
        chain(_job_task(job, ctx.eval_dir(job), run_id=run_id, index=index, arm=arm),
              confirm_winner.s(run_id=run_id, index=index, arm=arm, candidate_id=winner.id)
              .set(queue="coordinator")).apply_async()
        return
    # One selection per iteration, whatever the deliveries (a chord re-sent by `resume`
    # and the original one, or a redelivered callback).
    won = _advance(store, run_id, index, arm, ("evaluating", "selecting"), "done",
                              selected_id=winner.id, decision=decision,
                              eval_seconds=sum(c.duration_s or 0 for c in rows if not c.reused))
    if won:
        events.emit(run_id, "iteration", iteration=index, arm=arm, decision=decision,
                    score=winner.score, design=winner.design, candidate_id=winner.id)
    log.debug("selection took %.3fs", time.monotonic() - started)
    if _moved(won, store, run_id, index, arm, "done"):
        begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=index + 1, arm=arm))


@coordinator_task
def confirm_winner(result: dict, *, run_id: str, index: int, arm: str, candidate_id: int) -> None:
    """Compare the would-be winner's second score with its first; flag it if they differ."""
    store, ctx = _context(run_id)
    res = Result.from_dict(result)
    c = store.get_candidate(candidate_id)
    if c.rescore is None and not c.flagged:   # once, whatever the deliveries
        tol = ctx.config.rescore_tolerance * max(1.0, abs(c.score))
        agree = res.status == "ok" and res.score is not None and abs(res.score - c.score) <= tol
        note = "" if agree else (f"flagged: a fresh sandbox scored it {res.score!r} "
                                 f"({res.status}) against {c.score!r}; not selected")
        store.record_rescore(candidate_id, score=res.score if res.status == "ok" else None,
                             flagged=not agree, note=note)
        events.emit(run_id, "rescore", iteration=index, arm=arm, index=c.index,
                    score=c.score, rescore=res.score, flagged=not agree)
    finish_iteration.apply_async(args=([],), kwargs=dict(run_id=run_id, index=index, arm=arm,
                                                         candidate_ids=[]))


def _finish_arm(store: LineageStore, ctx: RunContext, arm: str) -> None:
    done = all(
        (it := store.get_iteration(ctx.run_id, ctx.config.iterations - 1, a)) is not None
        and it.stage == "done" for a in ctx.config.arms)
    if done and store.get_run(ctx.run_id).status == "running":
        store.set_run_status(ctx.run_id, "completed")
        events.emit(ctx.run_id, "done", status="completed")


@coordinator_task
def recover(*, run_id: str) -> None:
    """Re-dispatch every arm of a run at the stage the lineage DB records for it."""
    store, ctx = _context(run_id)
    if store.get_run(run_id).status != "running":
        return
    if not (ctx.dir / "prepared").exists():
        start.run.__wrapped__(run_id=run_id)
        return
    for arm in ctx.config.arms:
        its = store.iterations(run_id, arm=arm)
        if not its:
            begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=0, arm=arm))
            continue
        last = its[-1]
        if last.stage == "done":
            begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=last.index + 1, arm=arm))
        elif last.stage == "pending":
            begin_iteration.apply_async(kwargs=dict(run_id=run_id, index=last.index, arm=arm))
        else:
            stage = last.stage
            if stage == "generating" and get_proposer(arm).USES_LM \
                    and not ctx.lm_weights(arm, last.index).exists() \
                    and (_self_programming(ctx) or last.index == 0):
                # the trained LM's weights are gone: train again first
                _advance(store, run_id, last.index, arm, "generating", "training")
                stage = "training"
            _dispatch(store, ctx, last.index, arm, stage)
