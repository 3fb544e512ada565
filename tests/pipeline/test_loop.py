"""The self-reprogramming loop end to end: real sandboxes, real SQLite and PostgreSQL."""
from __future__ import annotations

import pytest

from pipeline import runs, stages
from pipeline.families.transformer import PARAMS
from pipeline.jobs import RunContext
from pipeline.settings import preset
from pipeline.store import TERMINAL_STATUSES, LineageStore
from tests.support.runs import embedded_settings as _settings, iteration_at_evaluation


def _check_selection_rule(store: LineageStore, run_id: str, direction: str) -> None:
    its = store.iterations(run_id)
    for it in its:
        rows = store.candidates(run_id, iteration=it.index)
        incumbent = next(c for c in rows if c.role == "incumbent")
        assert incumbent.id == it.incumbent_id and incumbent.source == it.source_in
        winner = store.get_candidate(it.selected_id)
        scored = [c for c in rows if c.role == "candidate" and c.status == "evaluated"]
        if it.decision == "kept":
            assert winner.id == incumbent.id
            assert all(c.score >= incumbent.score for c in scored) if direction == "min" \
                else all(c.score <= incumbent.score for c in scored)
        else:
            assert winner.role == "candidate" and winner.status == "evaluated"
            # the guard ran: a fresh sandbox reproduced the winner's score
            assert winner.rescore is not None and not winner.flagged
            assert winner.score < incumbent.score if direction == "min" else winner.score > incumbent.score
            assert all(winner.score <= c.score for c in scored)
    # the next iteration starts from the selected source
    for prev, nxt in zip(its, its[1:]):
        assert nxt.source_in == store.get_candidate(prev.selected_id).source


@pytest.mark.slow
def test_quick_run_end_to_end(database_url, tmp_path):
    settings = _settings(database_url, tmp_path)
    config = preset("smoke", iterations=2, candidates=3)
    events = []
    run_id = runs.launch(settings, config, progress=lambda e, i: events.append((e, i)))

    store = LineageStore(database_url)
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    its = store.iterations(run_id)
    assert [it.index for it in its] == [0, 1] and all(it.stage == "done" for it in its)
    assert all(len(it.lm_losses) > 0 for it in its)
    # the LM learned something: its loss fell during the training stage
    assert its[0].lm_losses[-1] < its[0].lm_losses[0] / 2

    cands = store.candidates(run_id)
    assert all(c.status in TERMINAL_STATUSES for c in cands)
    # exactly n generated candidates per iteration: a failed generation is a failure here
    for it in its:
        assert sorted(c.index for c in cands if c.iteration == it.index) == [0, 1, 2, 3], it
    assert not [e for e, _ in events if e == "generation_failed"], events
    assert len({(c.iteration, c.index) for c in cands}) == len(cands)   # no duplicates
    _check_selection_rule(store, run_id, "min")
    # the incumbent is evaluated once per run: every later incumbent is the source an
    # earlier evaluation scored already (the kept seed, or a winner), so it is reused
    incumbents = [c for c in cands if c.role == "incumbent"]
    assert not incumbents[0].reused and all(c.reused for c in incumbents[1:])
    assert all(c.score == store.get_candidate(its[c.iteration - 1].selected_id).score
               for c in incumbents[1:])

    seed = RunContext(run_id, config, settings).seed_source()
    for c in cands:
        chain = store.lineage(c.id)
        assert chain[0].parent_id is None and chain[0].source == seed
        assert chain[-1].id == c.id
    assert ("done", {"status": "completed"}) in events
    # the LM's training losses came live, as the sandbox trained, and the last one came
    # with the end of the training stage
    steps = [i for e, i in events if e == "lm_step" and i["iteration"] == 0]
    assert steps and all(s["loss"] == its[0].lm_losses[s["step"] - 1] for s in steps)
    trained = [i for e, i in events if e == "lm_trained" and i["iteration"] == 0]
    assert len(trained) == 1 and trained[0]["steps"] == len(its[0].lm_losses)
    assert trained[0]["final_loss"] == its[0].lm_losses[-1]
    # how well each LM copies was measured on the held-out slice and recorded, with why
    # its training stopped (the smoke preset's LM stops at its epochs, on the plateau),
    # and the share of samples that changed one parameter, from the candidates themselves
    for it in its:
        assert it.lm_stop == "epochs" and 0 <= it.lm_p_intact <= it.lm_copy_accuracy <= 1, it
        gen = [c for c in cands if c.iteration == it.index and c.role == "candidate"]
        parent = store.get_candidate(it.incumbent_id).design
        ones = sum(c.design is not None and sum(c.design[k] != parent[k] for k in PARAMS) == 1
                   for c in gen)
        assert it.single_edit_rate == ones / len(gen)
    assert trained[0]["p_intact"] == its[0].lm_p_intact
    # each scored candidate keeps what its code declared, and that is the design it has
    for c in cands:
        if c.status == "evaluated":
            model = c.declaration["model"]
            assert {k: model[k] for k in PARAMS} == {k: c.design[k] for k in PARAMS}, c.id
            assert c.declaration["optimizer"] == "AdamW"
    store.close()


HOSTILE = {
    "raises": ("invalid", "ZeroDivisionError", """
import torch
import transformers


def build_model(vocab_size):
    return 1 / 0


def train(model):
    return torch.optim.SGD(model.parameters(), lr=0.1), 8
"""),
    "loops": ("timeout", "deadline", """
import torch


def build_model(vocab_size):
    while True:
        pass


def train(model):
    return torch.optim.SGD(model.parameters(), lr=0.1), 8
"""),
    "memory": ("oom", "memory", """
import torch


def build_model(vocab_size):
    hog = torch.ones(400_000_000_000, dtype=torch.uint8)
    return hog


def train(model):
    return torch.optim.SGD(model.parameters(), lr=0.1), 8
"""),
    "policy": ("rejected", "import", """
import os


def build_model(vocab_size):
    os.system("echo pwned")


def train(model):
    return None, 1
"""),
}


def test_hostile_candidates_end_in_the_right_state_and_the_run_goes_on(sqlite_url, tmp_path):
    settings = _settings(sqlite_url, tmp_path, sandbox_memory_mb=1024)
    config = preset("smoke", iterations=1, candidates=len(HOSTILE), eval_timeout_s=25.0)
    # What the LM "generated" this time: four hostile sources, through the real gate.
    store, ctx, inc = iteration_at_evaluation(settings, config,
                                              [src for _, _, src in HOSTILE.values()])
    run_id = ctx.run_id
    stages._dispatch(store, ctx, 0, "lm", "evaluating")

    assert store.get_run(run_id).status == "completed"
    rows = {c.index: c for c in store.candidates(run_id)}
    assert rows[0].status == "evaluated" and rows[0].score > 0
    for i, (name, (status, words, _)) in enumerate(HOSTILE.items(), start=1):
        assert rows[i].status == status, (name, rows[i].status, rows[i].reason)
        assert rows[i].reason, name
        assert words and words.lower() in rows[i].reason.lower(), (name, rows[i].reason)
    it = store.get_iteration(run_id, 0)
    assert it.decision == "kept" and it.selected_id == inc.id


def test_a_winner_whose_score_a_fresh_sandbox_does_not_reproduce_is_flagged(sqlite_url, tmp_path):
    """As if the first evaluation of candidate 1 had been fooled into a very low loss:
    the re-score in a fresh sandbox disagrees, so it is flagged and not selected."""
    settings = _settings(sqlite_url, tmp_path)
    config = preset("smoke", iterations=1, candidates=2)
    store, ctx, inc = iteration_at_evaluation(settings, config, lambda ctx: [
        ctx.seed_source().replace("lr=0.01", "lr=0.02"),
        ctx.seed_source().replace("lr=0.01", "lr=0.03")])
    run_id = ctx.run_id
    forged, worse = store.candidates(run_id, iteration=0)[1:]
    store.record_result(inc.id, status="evaluated", score=5.0)
    store.record_result(forged.id, status="evaluated", score=0.001)
    store.record_result(worse.id, status="evaluated", score=50.0)

    stages.finish_iteration.apply_async(args=([],), kwargs=dict(run_id=run_id, index=0, arm="lm",
                                                              candidate_ids=[]))
    forged = store.get_candidate(forged.id)
    assert forged.flagged and forged.rescore is not None and forged.rescore > 1.0
    assert "flagged" in forged.reason
    it = store.get_iteration(run_id, 0)
    assert it.stage == "done" and it.decision == "kept" and it.selected_id == inc.id
    assert store.get_run(run_id).status == "completed"
