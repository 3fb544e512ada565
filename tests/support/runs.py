"""Runs for tests: embedded settings, and a run stopped just before an evaluation (for tests that choose what the LM "wrote")."""
from __future__ import annotations

from typing import Callable

from pipeline import celery_app, refinement, stages
from pipeline.store import store_for
from pipeline.jobs import RunContext
from pipeline.settings import RunConfig, Settings
from pipeline.store import CandidateView, LineageStore

Sources = list[str] | Callable[[RunContext], list[str]]


def iteration_at_evaluation(settings: Settings, config: RunConfig,
                            sources: Sources) -> tuple[LineageStore, RunContext, CandidateView]:
    """Prepare a run, make its seed the incumbent of iteration 0, and add `sources` as the
    generated candidates through the real policy gate. `stages._dispatch(store, ctx, 0, "lm",
    "evaluating")` then evaluates them as the loop would."""
    celery_app.configure(settings)
    store = store_for(settings.database_url)
    run_id = store.create_run(config=config.to_dict(), task=config.task, preset=config.preset,
                              seed=config.seed)
    store.set_run_status(run_id, "running")
    ctx = RunContext(run_id, config, settings)
    ctx.prepare()
    seed = ctx.seed_source()
    store.ensure_iteration(run_id, 0, source_in=seed)
    inc = store.ensure_candidate(run_id, 0, 0, role="incumbent", source=seed, parent_id=None,
                                 design=refinement.parse(seed, ctx.task))
    store.update_iteration(run_id, 0, stage="evaluating", incumbent_id=inc.id)
    chosen = sources(ctx) if callable(sources) else sources
    stages._add_candidates(store, ctx, 0, "lm",
                           [(src, refinement.parse(src, ctx.task)) for src in chosen])
    return store, ctx, inc


def embedded_settings(database_url, tmp_path, **kw) -> Settings:
    """Settings of an embedded run (no broker) on `database_url`, process sandbox."""
    return Settings.from_env(env={}, database_url=database_url,
                             artifact_dir=str(tmp_path / "artifacts"),
                             sandbox_backend="process", **kw)


def random_refinements(ctx: RunContext, source: str, index: int) -> list[str]:
    """The sources the random arm makes candidates of at iteration `index` from `source`:
    its proposer's draws, then the distinct choice stages.after_generation makes."""
    from pipeline.proposers import Request, random_refinement
    n = ctx.config.candidates * ctx.config.sample_factor
    drawn = random_refinement.propose(Request(ctx, "random", index, source, n)).samples
    designs = [refinement.parse(s, ctx.task) for s in drawn]
    keep = refinement.choose_distinct(ctx.family, refinement.parse(source, ctx.task), designs,
                                      ctx.config.candidates)
    return [drawn[i] for i in keep]
