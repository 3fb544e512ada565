"""Programming other AI end to end: the LM and the random control arm write CNN sources
for a vision task, real sandboxes (process backend) score them by accuracy, the lineage
store (SQLite and PostgreSQL) keeps every candidate, and the CLI plots and sweeps."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline import stages
from pipeline.cli import main
from pipeline.families import cnn
from pipeline.jobs import RunContext
from pipeline.settings import Settings, preset
from pipeline.store import TERMINAL_STATUSES, LineageStore
from tests.support.runs import iteration_at_evaluation

# Tiny sizes: an LM trained for a few steps writes mostly broken sources, which is fine
# here (the loop must account for them); the random arm always yields valid networks.
TINY = ["--set", "dataset_size=128", "--set", "lm_epochs=2", "--set", "train_samples=300",
        "--set", "eval_samples=100", "--set", "max_new_tokens=200"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(database_url: str, tmp_path, *args: str):
    runner = CliRunner()
    result = runner.invoke(main, ["--database-url", database_url,
                                  "--artifact-dir", str(tmp_path / "artifacts"), *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _check_selection_rule_per_arm(store: LineageStore, run_id: str) -> None:
    """Accuracy: higher is better; the incumbent is kept unless a candidate beats it."""
    for it in store.iterations(run_id):
        rows = store.candidates(run_id, iteration=it.index, arm=it.arm)
        incumbent = next(c for c in rows if c.role == "incumbent")
        assert incumbent.id == it.incumbent_id and incumbent.source == it.source_in
        assert incumbent.status == "evaluated" and 0.0 <= incumbent.score <= 1.0
        scored = [c for c in rows if c.role == "candidate" and c.status == "evaluated"]
        winner = store.get_candidate(it.selected_id)
        if it.decision == "kept":
            assert winner.id == incumbent.id
            assert all(c.score <= incumbent.score for c in scored), (it.arm, it.index)
        else:
            assert winner.role == "candidate" and winner.status == "evaluated"
            assert winner.score > incumbent.score
            assert all(c.score <= winner.score for c in scored)
    for arm in ("lm", "random"):
        its = store.iterations(run_id, arm=arm)
        for prev, nxt in zip(its, its[1:]):
            assert nxt.source_in == store.get_candidate(prev.selected_id).source


@pytest.mark.slow
def test_digits_quick_run_both_arms_end_to_end(database_url, tmp_path):
    out = _cli(database_url, tmp_path, "launch", "--task", "digits", "--iterations", "2",
               "--candidates", "3", "--backend", "process", "--json", *TINY)
    run_id = json.loads(out.stdout)["run_id"]

    store = LineageStore(database_url)
    run = store.get_run(run_id)
    assert run.status == "completed", run.error
    # vision launches run the random control arm beside the LM by default
    assert tuple(run.config["arms"]) == ("lm", "random") and run.task == "digits"
    for arm in ("lm", "random"):
        its = store.iterations(run_id, arm=arm)
        assert [it.index for it in its] == [0, 1] and all(it.stage == "done" for it in its)
    # the LM is the seed LM trained once; the random arm never trains one
    assert len(store.iterations(run_id, arm="lm")[0].lm_losses) > 0
    assert all(not it.lm_losses for it in store.iterations(run_id, arm="random"))

    cands = store.candidates(run_id)
    assert all(c.status in TERMINAL_STATUSES for c in cands)
    assert len({(c.arm, c.iteration, c.index) for c in cands}) == len(cands)   # no duplicates
    generated = {arm: [c for c in cands if c.arm == arm and c.role == "candidate"]
                 for arm in ("lm", "random")}
    assert len(generated["random"]) == 2 * 3      # the same budget as the LM arm asks for
    assert 0 < len(generated["lm"]) <= 2 * 3
    assert all(c.status == "evaluated" for c in generated["random"])
    for c in cands:
        if c.status != "evaluated":
            assert c.reason, (c.id, c.status)
    _check_selection_rule_per_arm(store, run_id)

    # lineage: every candidate of both arms goes back to the seed network
    ctx = RunContext(run_id, preset("quick", task="digits"), Settings.from_env(env={}))
    seed = ctx.seed_source()
    assert cnn.parse(seed) == cnn.SEED.params()
    for c in cands:
        chain = store.lineage(c.id)
        assert chain[0].parent_id is None and chain[0].source == seed, c.id
        assert chain[0].iteration == 0 and chain[0].arm == c.arm and chain[-1].id == c.id
    # every evaluation stored its per-step training loss (the Figure 3 curves)
    curves = {cv.candidate_id for cv in store.curves(run_id, name="fewshot_loss")}
    assert {c.id for c in cands if c.status == "evaluated"} <= curves
    store.close()

    shown = json.loads(_cli(database_url, tmp_path, "show", run_id, "--json").stdout)
    assert set(shown["arms"]) == {"lm", "random"}
    for o in shown["arms"].values():
        assert o["iterations_done"] == 2 and o["end"] >= o["start"]   # keep-original rule
    text = _cli(database_url, tmp_path, "show", run_id).stdout
    assert "random" in text and "arms, seed score -> selected score" in text

    files = json.loads(_cli(database_url, tmp_path, "plot", run_id, "--json").stdout)["files"]
    names = {f.rsplit("/", 1)[-1] for f in files}
    assert {"candidate_loss.png", "design_params.png", "best_params.png"} <= names
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, f


def _source_with_in_features(design: cnn.Design, wrong: int) -> str:
    """A rendered source whose first dense layer expects `wrong` input features."""
    src = cnn.render(design)
    right = "in_features = in_channels * math.prod(size)"
    assert right in src
    return src.replace(right, f"in_features = {wrong}", 1)


def test_wrong_in_features_ends_invalid_with_the_shape_error(sqlite_url, tmp_path):
    settings = Settings.from_env(env={}, database_url=sqlite_url,
                                 artifact_dir=str(tmp_path / "artifacts"), sandbox_backend="process")
    config = preset("smoke", task="digits", arms="lm", iterations=1, candidates=3, train_samples=200,
                    eval_samples=60, dataset_size=64)
    two_convs = cnn.Design(hidden_layers=1, conv_layers=2, channels=32, hidden_size=16)

    def sources(ctx):
        assert ctx.task.input_shape == (1, 8, 8)   # the right sizes below are digits'
        return [
            # the paper's Table 2 edit done wrong: convs added, in_features not recomputed
            # (8x8 -> 6x6 -> 4x4 -> pool 2x2: 32 * 4 = 128 is right)
            _source_with_in_features(two_convs, wrong=64),
            # a dense-only network with the wrong flattened size (64 is right)
            _source_with_in_features(cnn.SEED, wrong=60),
            # the same edit done right: it runs and is scored
            cnn.render(two_convs),
        ]
    store, ctx, inc = iteration_at_evaluation(settings, config, sources)
    run_id = ctx.run_id
    stages._dispatch(store, ctx, 0, "lm", "evaluating")

    assert store.get_run(run_id).status == "completed"
    rows = {c.index: c for c in store.candidates(run_id)}
    for i in (1, 2):
        assert rows[i].status == "invalid", (rows[i].status, rows[i].reason)
        assert "shapes cannot be multiplied" in rows[i].reason, rows[i].reason
        assert "candidate line" in rows[i].reason, rows[i].reason
        assert rows[i].score is None
    assert rows[3].status == "evaluated" and 0.0 <= rows[3].score <= 1.0
    assert rows[0].status == "evaluated"
    it = store.get_iteration(run_id, 0)
    assert it.selected_id == (rows[3].id if rows[3].score > rows[0].score else inc.id)


@pytest.mark.slow
def test_sweep_runs_the_grid_records_the_group_and_plots(sqlite_url, tmp_path):
    # arms=random: the grid machinery without an LM to train, so this stays quick
    args = ["sweep", "--task", "digits", "--candidates", "1,2", "--iterations", "1",
            "--name", "grid-a", "--backend", "process", "--json",
            "--set", "arms=random", "--set", "train_samples=200", "--set", "eval_samples=60",
            "--set", "dataset_size=64"]
    first = json.loads(_cli(sqlite_url, tmp_path, *args).stdout)
    assert first["sweep"] == "grid-a" and len(first["cells"]) == 2
    assert {(c["candidates"], c["iterations"]) for c in first["cells"]} == {(1, 1), (2, 1)}
    for c in first["cells"]:
        assert c["status"] == "completed" and c["lm"] is None
        assert 0.0 <= c["start"] <= c["random"] <= 1.0
    with open(first["figure"], "rb") as fh:
        assert fh.read().startswith(PNG_MAGIC)
    with LineageStore(sqlite_url) as store:
        runs = store.list_runs()
        assert len(runs) == 2 and all(r.config["sweep"] == "grid-a" for r in runs)
    # the same name again resumes: completed cells are reused, nothing is launched
    again = json.loads(_cli(sqlite_url, tmp_path, *args).stdout)
    assert [c["run_id"] for c in again["cells"]] == [c["run_id"] for c in first["cells"]]
    with LineageStore(sqlite_url) as store:
        assert len(store.list_runs()) == 2
    # --no-launch reports a partial grid (a cell that never ran shows as missing)
    wider = [a if a != "1,2" else "1,2,4" for a in args] + ["--no-launch"]
    partial = json.loads(_cli(sqlite_url, tmp_path, *wider).stdout)
    status = {c["candidates"]: c["status"] for c in partial["cells"]}
    assert status == {1: "completed", 2: "completed", 4: "missing"}
    with LineageStore(sqlite_url) as store:
        assert len(store.list_runs()) == 2
