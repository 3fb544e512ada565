"""The proposers (pipeline/proposers/): one registry, one interface, arms as data. A toy
proposer added with one registration line runs as an arm of a real embedded run; the
lineage proposer's training pairs and weights come from a stored lineage."""
from __future__ import annotations

import json
import sys
import types

import pytest
from click.testing import CliRunner

from pipeline import proposers, refinement
from pipeline.cli import main
from pipeline.families import cnn
from pipeline.jobs import RunContext
from pipeline.proposers import Proposal, Request, history, lineage
from pipeline.settings import ConfigError, Settings, preset
from pipeline.store import LineageStore

TINY = ["--set", "train_samples=300", "--set", "eval_samples=100", "--set", "dataset_size=64"]


def _wider() -> types.ModuleType:
    """A toy proposer: every draw doubles the hidden size (then halves it back when it
    cannot): no LM, no sandbox job."""
    m = types.ModuleType("wider")
    m.NAME, m.USES_LM = "wider", False
    m.job = lambda request: None

    def propose(request, result=None):
        design = cnn.design_from_params(cnn.parse(request.parent))
        new = cnn.step("hidden_size", design.hidden_size, +1) or design.hidden_size // 2
        return Proposal([cnn.render(cnn.Design(**{**design.to_dict(), "hidden_size": new}))] * request.n)
    m.propose = propose
    return m


@pytest.fixture
def wider():
    yield proposers.register(_wider())
    proposers.unregister("wider")


def test_the_registry_checks_what_it_is_given(wider):
    assert proposers.names()[:3] == ("lm", "random", "lineage") and "wider" in proposers.names()
    assert proposers.get_proposer("wider") is wider
    with pytest.raises(TypeError, match="lacks"):
        proposers.register(types.SimpleNamespace(NAME="half"))
    with pytest.raises(ValueError, match="must match"):
        proposers.register(types.SimpleNamespace(NAME="Bad Name", USES_LM=False, job=None, propose=None))
    with pytest.raises(proposers.UnknownProposer):
        proposers.get_proposer("nope")
    assert preset("quick", task="digits", arms="wider,random").arms == ("wider", "random")
    with pytest.raises(ConfigError, match="unknown: nope"):
        preset("quick", arms="lm,nope")


def _cli(url, tmp_path, *args):
    r = CliRunner().invoke(main, ["--database-url", url, "--artifact-dir", str(tmp_path / "a"), *args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stdout


@pytest.mark.slow
def test_a_toy_proposer_runs_as_an_arm_and_show_reports_what_is_stored(wider, sqlite_url, tmp_path):
    out = _cli(sqlite_url, tmp_path, "launch", "--task", "digits", "--iterations", "2",
               "--candidates", "2", "--backend", "process", "--json",
               "--set", "arms=wider,random", *TINY)
    run_id = json.loads(out)["run_id"]
    store = LineageStore(sqlite_url)
    assert store.get_run(run_id).status == "completed", store.get_run(run_id).error
    for it in store.iterations(run_id, arm="wider"):
        parent = cnn.parse(it.source_in)
        made = [c for c in store.candidates(run_id, iteration=it.index, arm="wider")
                if c.role == "candidate"]
        # n identical draws: the distinct rule keeps the one new network and a repeat
        assert len(made) == 2 and all(c.design["hidden_size"] != parent["hidden_size"] for c in made)
        assert it.single_edit_rate == 1.0
    # show --json: each arm's start and end are the stored scores of the seed's
    # evaluation and of the source the last iteration selected
    shown = json.loads(_cli(sqlite_url, tmp_path, "show", run_id, "--json"))
    assert list(shown["arms"]) == ["random", "wider"]      # the registry's order
    for arm, o in shown["arms"].items():
        its = store.iterations(run_id, arm=arm)
        assert o["start"] == store.get_candidate(its[0].incumbent_id).score
        assert o["end"] == store.get_candidate(its[-1].selected_id).score
        assert o["iterations_done"] == 2
    rows = [r for r in shown["iterations"] if r["arm"] == "wider"]
    assert [r["score"] for r in rows] == [store.get_candidate(it.selected_id).score
                                          for it in store.iterations(run_id, arm="wider")]
    listed = json.loads(_cli(sqlite_url, tmp_path, "candidates", run_id, "--arm", "wider", "--json"))
    assert {c["arm"] for c in listed} == {"wider"} and len(listed) == 2 * 3
    store.close()


def _stored_lineage(store, direction_scores):
    """A run with one arm's iteration 0: the seed incumbent and three candidates (a
    single edit that gains, a single edit that loses, a double edit that gains)."""
    run_id = store.create_run(config={}, task="digits", preset="quick", seed=0)
    seed = cnn.SEED
    seed_src = cnn.render(seed)
    store.ensure_iteration(run_id, 0, source_in=seed_src, arm="lineage")
    inc = store.ensure_candidate(run_id, 0, 0, role="incumbent", source=seed_src, parent_id=None,
                                 design=cnn.parse(seed_src), arm="lineage")
    store.record_result(inc.id, status="evaluated", reason="", score=direction_scores[0])
    designs = [cnn.Design(hidden_layers=2, conv_layers=0, channels=32, hidden_size=16),
               cnn.Design(hidden_layers=1, conv_layers=0, channels=32, hidden_size=32),
               cnn.Design(hidden_layers=2, conv_layers=1, channels=32, hidden_size=16)]
    for i, (d, score) in enumerate(zip(designs, direction_scores[1:]), start=1):
        src = cnn.render(d)
        c = store.ensure_candidate(run_id, 0, i, role="candidate", source=src, parent_id=inc.id,
                                   design=cnn.parse(src), arm="lineage")
        store.record_result(c.id, status="evaluated", reason="", score=score)
    return run_id, seed_src


def test_lineage_pairs_are_the_improving_single_edits_weighted_by_advantage(store):
    run_id, seed_src = _stored_lineage(store, [0.50, 0.70, 0.40, 0.90])
    edits = history.edits(store, run_id, "lineage", 1, "max")
    assert len(edits) == 3 and [round(e.advantage(), 2) for e in edits] == [0.2, -0.1, 0.4]
    pairs, weights = lineage.pairs(cnn, edits)
    # the double edit gained most but is not one move; the losing edit teaches nothing
    assert len(pairs) == 1 and weights == [pytest.approx(0.2)]
    src, tgt = pairs[0]
    assert src == seed_src and tgt.startswith("# refine: hidden_layers +\n")
    assert refinement.strip_header(tgt) == edits[0].child_source
    assert history.improving_moves(cnn, edits) == {("hidden_layers", "+")}
    # a loss (lower is better) turns the signs round
    run_id, _ = _stored_lineage(store, [0.50, 0.70, 0.40, 0.90])
    edits = history.edits(store, run_id, "lineage", 1, "min")
    assert [m for e in edits if e.advantage() > 0
            for m in [history.move(cnn, e.parent_design, e.child_design)]] == [("hidden_size", "+")]


def test_repeat_rate_counts_draws_that_repeat_an_improving_move():
    seed = cnn.SEED.params()
    deeper = {**seed, "hidden_layers": 2}
    wider = {**seed, "hidden_size": 32}
    moves = {("hidden_layers", "+")}
    assert history.repeat_rate(cnn, seed, [deeper, wider, None, deeper], moves) == 0.5
    assert history.repeat_rate(cnn, seed, [deeper], set()) is None


def test_the_lineage_job_fine_tunes_only_with_pairs(store, tmp_path):
    run_id, seed_src = _stored_lineage(store, [0.50, 0.70, 0.40, 0.90])
    cfg = preset("quick", task="digits", arms="lineage", dataset_size=64)
    settings = Settings.from_env(env={}, database_url=store.url, artifact_dir=str(tmp_path))
    ctx = RunContext(run_id, cfg, settings)
    ctx.prepare()
    job = lineage.job(Request(ctx, "lineage", 1, seed_src, 4))
    assert set(job.inputs) == {"weights", "lineage", "data"} and job.params["finetune_steps"] == 60
    assert job.inputs["weights"].startswith(str(ctx.dir / "arm-lineage"))
    from safetensors.torch import load_file
    assert load_file(job.inputs["lineage"])["weight"].tolist() == [pytest.approx(0.2)]
    first = lineage.job(Request(ctx, "lineage", 0, seed_src, 4))   # nothing before iteration 0
    assert set(first.inputs) == {"weights"} and "finetune_steps" not in first.params


def test_arms_of_a_vision_run_share_its_one_trained_seed_lm(tmp_path):
    settings = Settings.from_env(env={}, artifact_dir=str(tmp_path))
    ctx = RunContext("r", preset("quick", task="digits", arms="lm,lineage"), settings)
    assert ctx.lm_weights("lineage", 0) == ctx.dir / "arm-lineage" / "lm" / "weights.safetensors"
    trained = ctx.lm_weights("lm", 0)
    trained.parent.mkdir(parents=True)
    trained.write_bytes(b"weights")
    assert ctx.lm_weights("lineage", 3) == trained      # the same seed LM, trained once
    own = RunContext("r", preset("quick", arms="lm,lineage"), settings)   # the self task
    assert own.lm_weights("lineage", 0) != own.lm_weights("lm", 0)


@pytest.mark.slow
def test_the_lineage_arm_fine_tunes_in_a_real_sandbox_once_an_edit_improved(sqlite_url, tmp_path):
    from dataclasses import asdict

    from pipeline import runs, sandbox_task
    from sandbox.schema import Result
    from tests.support.runs import embedded_settings

    settings = embedded_settings(sqlite_url, tmp_path)
    cfg = preset("smoke", task="digits", arms="lineage", iterations=1, candidates=2,
                 dataset_size=64, train_samples=200, eval_samples=60, lm_max_steps=20,
                 lm_copy_criterion=0.0, lineage_steps=5, lineage_batch=4)
    run_id = runs.launch(settings, cfg)
    store = LineageStore(sqlite_url)
    assert store.get_run(run_id).status == "completed", store.get_run(run_id).error
    ctx = RunContext(run_id, cfg, settings)
    it = store.iterations(run_id, arm="lineage")[0]
    assert it.finetune_losses is None and it.finetune_pairs == 0   # nothing to learn from yet
    # an edit of iteration 0 that gained: what the LM learns from before iteration 1
    incumbent = store.get_candidate(it.incumbent_id)
    deeper = cnn.render(cnn.Design(**{**cnn.SEED.to_dict(), "hidden_layers": 2}))
    c = store.ensure_candidate(run_id, 0, 9, role="candidate", source=deeper,
                               parent_id=incumbent.id, design=cnn.parse(deeper), arm="lineage")
    store.record_result(c.id, status="evaluated", reason="", score=incumbent.score + 0.05)
    request = Request(ctx, "lineage", 1, deeper, 3)
    job = lineage.job(request)
    raw = sandbox_task.run_job.apply(args=(asdict(job), str(tmp_path / "gen"))).get()
    result = Result.from_dict(raw)
    assert result.status == "ok", result.reason
    proposal = lineage.propose(request, result)
    assert len(proposal.samples) == 3
    assert proposal.metadata["finetune_pairs"] == 1
    assert len(proposal.metadata["finetune_losses"]) == 5
    assert all(x > 0 for x in proposal.metadata["finetune_losses"])
    store.close()
