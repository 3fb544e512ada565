"""Two runs racing on the same evaluation keys through real Celery workers over Redis,
with PostgreSQL: every key is evaluated in one sandbox, the other run waits for it and
takes its outcome (pipeline/stages.py `await_evaluation`)."""
from __future__ import annotations

import threading

import pytest

from pipeline import celery_app, stages
from pipeline.settings import Settings
from pipeline.store import LineageStore
from tests.support.cluster import Cluster, quick_config, wait_for
from tests.support.runs import iteration_at_evaluation, random_refinements


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_two_runs_racing_on_one_key_evaluate_it_once(postgres_url, redis_url, tmp_path,
                                                     restore_embedded):
    with Cluster(tmp_path, broker_url=redis_url, database_url=postgres_url) as cl:
        for name, queue in (("coordinator1", "coordinator"), ("coordinator2", "coordinator"),
                            ("sandbox1", "sandbox"), ("sandbox2", "sandbox")):
            cl.start(name, queue, wait=False)
        for w in cl.workers.values():
            cl.wait_ready(w)
        settings = Settings.from_env(env={}, database_url=postgres_url, broker_url=redis_url,
                                     artifact_dir=str(tmp_path / "artifacts"),
                                     sandbox_backend="process")
        celery_app.configure(settings)
        config = quick_config(iterations=1)
        sources = lambda ctx: random_refinements(ctx, ctx.seed_source(), 0)
        runs = [iteration_at_evaluation(settings, config, sources) for _ in range(2)]
        # both iterations start evaluating at once: their claims race in PostgreSQL
        go = threading.Barrier(2)

        def dispatch(store, ctx):
            go.wait(timeout=30)
            stages._dispatch(store, ctx, 0, "lm", "evaluating")
        threads = [threading.Thread(target=dispatch, args=(store, ctx)) for store, ctx, _ in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        ids = [ctx.run_id for _, ctx, _ in runs]
        with LineageStore(postgres_url) as store:
            wait_for(lambda: all(store.get_run(r).status == "completed" for r in ids), 600,
                     "both runs to complete", poll=1.0, diagnose=cl.logs)
            a, b = (store.candidates(r, iteration=0) for r in ids)
            keys = {c.evaluation_key for c in a + b}
            assert None not in keys and {c.evaluation_key for c in a} == keys
            # each key ran in exactly one sandbox; the other run's candidate took it
            for key in keys:
                mine = [c for c in a + b if c.evaluation_key == key]
                assert sum(not c.reused for c in mine) == 1, [(c.run_id, c.reused) for c in mine]
                assert len({c.score for c in mine}) == 1
                assert store.get_evaluation(key).status == "done"
            assert [c.score for c in a] == [c.score for c in b]
            rescores = sum(c.rescore is not None for c in a + b)   # a winner's fresh re-score
        jobs = cl.workers["sandbox1"].succeeded() + cl.workers["sandbox2"].succeeded()
        assert jobs == len(keys) + rescores, (jobs, len(keys), rescores)
