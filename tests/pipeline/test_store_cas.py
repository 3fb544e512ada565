"""`LineageStore.advance_stage`: the compare-and-set that makes stage transitions of the
loop safe against tasks delivered twice, on SQLite and PostgreSQL."""
from __future__ import annotations

import threading

import pytest

from pipeline.store import LineageStore, StoreError


def _iteration(store: LineageStore) -> str:
    run_id = store.create_run(config={}, task="self", preset="quick", seed=0)
    store.ensure_iteration(run_id, 0, source_in="x = 1\n")
    return run_id


def test_only_the_first_transition_wins_and_writes_its_fields(store):
    run_id = _iteration(store)
    c = store.ensure_candidate(run_id, 0, 0, role="incumbent", source="x = 1\n",
                               parent_id=None, design=None)
    assert store.advance_stage(run_id, 0, "lm", "pending", "training", incumbent_id=c.id)
    assert not store.advance_stage(run_id, 0, "lm", "pending", "generating")
    it = store.get_iteration(run_id, 0)
    assert it.stage == "training" and it.incumbent_id == c.id
    # the loser's fields are not written
    assert not store.advance_stage(run_id, 0, "lm", "pending", "training", lm_seconds=9.0)
    assert store.get_iteration(run_id, 0).lm_seconds is None
    assert store.advance_stage(run_id, 0, "lm", ("evaluating", "training"), "done",
                               selected_id=c.id, decision="kept")
    it = store.get_iteration(run_id, 0)
    assert it.stage == "done" and it.decision == "kept" and it.finished_at is not None


def test_bad_transitions_are_refused(store):
    run_id = _iteration(store)
    with pytest.raises(ValueError):
        store.advance_stage(run_id, 0, "lm", "pending", "flying")
    with pytest.raises(ValueError):
        store.advance_stage(run_id, 0, "lm", "pending", "training", source_in="y")
    with pytest.raises(StoreError):
        store.advance_stage(run_id, 7, "lm", "pending", "training")
    assert store.get_iteration(run_id, 0).stage == "pending"


@pytest.mark.postgres
def test_concurrent_callers_on_postgres_one_winner(postgres_url):
    stores = [LineageStore(postgres_url, create=True) for _ in range(8)]
    try:
        run_id = _iteration(stores[0])
        barrier = threading.Barrier(len(stores))
        wins: list[bool] = []

        def race(s: LineageStore) -> None:
            barrier.wait()
            wins.append(s.advance_stage(run_id, 0, "lm", "pending", "training"))

        threads = [threading.Thread(target=race, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False] * 7 + [True]
    finally:
        for s in stores:
            s.close()
