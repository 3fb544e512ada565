"""The figures show the stored data: each test writes a run into a real lineage store,
draws the figure from the store's views, reads the plotted lines back from the
matplotlib Figure and compares them with what the store holds (a figure without its
data would still be a valid PNG of about the same size, so the file proves nothing)."""
from __future__ import annotations

import math

import pytest

from pipeline import plots
from pipeline.families import get_family, plotted
from pipeline.store import LineageStore


def lines(ax) -> dict[str, tuple[list, list]]:
    """{label: (x, y)} of the data lines of an axes."""
    return {ln.get_label(): ([float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()])
            for ln in ax.get_lines()}


def cnn_design(hidden_layers, conv_layers, hidden_size, channels) -> dict:
    return {"hidden_layers": hidden_layers, "conv_layers": conv_layers,
            "hidden_size": hidden_size, "channels": channels}


@pytest.fixture
def lm_run(sqlite_url):
    """A self-programming run: iteration 0 stores its LM losses on the row, iteration 1
    only as an 'lm_loss' curve; iteration 0 replaces the seed, iteration 1 keeps it."""
    s = LineageStore(sqlite_url, create=True)
    run = s.create_run(config={}, task="self", preset="quick", seed=0)
    s.ensure_iteration(run, 0, source_in="seed")
    seed = s.ensure_candidate(run, 0, 0, role="incumbent", source="a", parent_id=None, design=None)
    good = s.ensure_candidate(run, 0, 1, role="candidate", source="b", parent_id=seed.id,
                              design=None)
    s.record_result(seed.id, status="evaluated", score=3.25, param_count=1000)
    s.record_result(good.id, status="evaluated", score=2.5, param_count=800)
    s.update_iteration(run, 0, stage="done", incumbent_id=seed.id, selected_id=good.id,
                       decision="replaced", lm_losses=[4.0, 3.5, 2.75, 2.5])
    s.ensure_iteration(run, 1, source_in="b")
    inc = s.ensure_candidate(run, 1, 0, role="incumbent", source="b", parent_id=good.id,
                             design=None)
    s.record_result(inc.id, status="evaluated", score=2.4, param_count=800)
    s.update_iteration(run, 1, stage="done", incumbent_id=inc.id, selected_id=inc.id,
                       decision="kept")
    s.add_curve(run, "lm_loss", [2.5, 2.0, 1.5], iteration=1)
    yield s, run
    s.close()


def test_lm_loss_figure_plots_each_iterations_stored_losses(lm_run):
    s, run = lm_run
    its = s.iterations(run)
    fig = plots.lm_loss_figure(s.get_run(run), its, s.curves(run))
    got = lines(fig.axes[0])
    assert got == {
        "iteration 0": ([1.0, 2.0, 3.0, 4.0], list(its[0].lm_losses)),
        "iteration 1": ([1.0, 2.0, 3.0], list(s.curves(run, "lm_loss")[0].values)),
    }
    assert got["iteration 0"][1] == [4.0, 3.5, 2.75, 2.5]


def test_scores_figure_plots_the_selected_and_incumbent_scores(lm_run):
    s, run = lm_run
    its = s.iterations(run)
    cands = {c.id: c for c in s.candidates(run)}
    fig = plots.scores_figure(s.get_run(run), its, list(cands.values()))
    got = lines(fig.axes[0])
    assert got == {
        "selected": ([0.0, 1.0], [cands[it.selected_id].score for it in its]),
        "incumbent": ([0.0, 1.0], [cands[it.incumbent_id].score for it in its]),
    }
    assert got["selected"][1] == [2.5, 2.4]


def test_a_run_without_data_draws_no_line(sqlite_url):
    with LineageStore(sqlite_url, create=True) as s:
        run = s.create_run(config={}, task="self", preset="quick", seed=0)
        view = s.get_run(run)
        assert lines(plots.lm_loss_figure(view, [], []).axes[0]) == {}
        assert lines(plots.scores_figure(view, [], []).axes[0]) == {}


@pytest.fixture
def vision_run(sqlite_url):
    """A vision run with two iterations of the LM arm and one of the random arm."""
    s = LineageStore(sqlite_url, create=True)
    run = s.create_run(config={}, task="mnist", preset="quick", seed=0)
    ids = {}
    for arm in ("lm", "random"):
        s.ensure_iteration(run, 0, source_in="seed", arm=arm)
    seed = s.ensure_candidate(run, 0, 0, role="incumbent", source="seed", parent_id=None,
                              design=cnn_design(1, 1, 64, 16))
    s.record_result(seed.id, status="evaluated", score=0.5, param_count=5000)
    rows = [  # (arm, iteration, index, design, status, score, params)
        ("lm", 0, 1, cnn_design(2, 1, 128, 32), "evaluated", 0.8, 9000),
        ("lm", 0, 2, cnn_design(4, 3, 32, 8), "evaluated", 0.6, 3000),
        ("lm", 0, 3, cnn_design(9, 9, 4096, 512), "invalid", None, None),   # not evaluated
        ("lm", 0, 4, {"hidden_layers": 1}, "evaluated", 0.1, 10),           # incomplete design
        ("lm", 1, 1, cnn_design(3, 0, 256, 1), "evaluated", 0.9, 20000),
        ("random", 0, 1, cnn_design(1, 2, 16, 4), "evaluated", 0.55, 700),
    ]
    for arm, iteration, index, design, status, score, params in rows:
        if (arm, iteration) == ("lm", 1) and "lm1" not in ids:
            s.ensure_iteration(run, 1, source_in="x", arm="lm")
            ids["lm1"] = True
        c = s.ensure_candidate(run, iteration, index, role="candidate", source=f"{arm}{index}",
                               parent_id=seed.id, design=design, arm=arm)
        if status == "evaluated":
            s.record_result(c.id, status=status, score=score, param_count=params)
        else:
            s.record_result(c.id, status=status, reason="boom")
        ids[(arm, iteration, index)] = c.id
    s.update_iteration(run, 0, arm="lm", stage="done", incumbent_id=seed.id,
                       selected_id=ids[("lm", 0, 1)], decision="replaced")
    s.update_iteration(run, 1, arm="lm", stage="done", incumbent_id=ids[("lm", 0, 1)],
                       selected_id=ids[("lm", 1, 1)], decision="replaced")
    s.update_iteration(run, 0, arm="random", stage="done", incumbent_id=seed.id,
                       selected_id=ids[("random", 0, 1)], decision="replaced")
    yield s, run, ids
    s.close()


def test_design_averages_mean_the_evaluated_candidates_widths_as_log2(vision_run):
    s, run, _ = vision_run
    cands = s.candidates(run)
    shown = plotted(get_family("cnn"))
    lm = plots.design_averages(cands, "lm", shown)
    # iteration 0: only the two evaluated candidates with a whole design count
    assert lm[0] == {"hidden_layers": 3.0, "conv_layers": 2.0,
                     "hidden_size": (7 + 5) / 2, "channels": (5 + 3) / 2, "n": 2}
    assert lm[1] == {"hidden_layers": 3.0, "conv_layers": 0.0, "hidden_size": 8.0,
                     "channels": 0.0, "n": 1}
    assert plots.design_averages(cands, "random", shown) == {
        0: {"hidden_layers": 1.0, "conv_layers": 2.0, "hidden_size": 4.0, "channels": 2.0,
            "n": 1}}


def test_design_params_figure_plots_the_averages_per_arm(vision_run):
    s, run, _ = vision_run
    cands = s.candidates(run)
    fig = plots.design_params_figure(s.get_run(run), s.iterations(run), cands)
    shown = plotted(get_family("cnn"))       # the run's task (mnist) is a cnn task
    expected = {arm: plots.design_averages(cands, arm, shown) for arm in ("lm", "random")}
    assert [ax.get_ylabel() for ax in fig.axes] == [f"avg {label}" for _, label, _ in shown]
    for ax, (key, _, _) in zip(fig.axes, shown):
        got = lines(ax)
        assert got == {f"{arm} arm": ([float(i) for i in pts], [pts[i][key] for i in pts])
                       for arm, pts in expected.items()}
    assert lines(fig.axes[0])["lm arm"] == ([0.0, 1.0], [3.0, 3.0])


def test_design_params_figure_of_a_task_this_installation_does_not_know(sqlite_url):
    with LineageStore(sqlite_url, create=True) as s:
        run = s.create_run(config={}, task="retired-task", preset="quick", seed=0)
        fig = plots.design_params_figure(s.get_run(run), [], [])
    assert len(fig.axes) == 1 and lines(fig.axes[0]) == {}
    assert "no design parameters known" in fig.axes[0].texts[0].get_text()


def test_best_params_figure_plots_the_seed_then_each_selected_models_size(vision_run):
    s, run, ids = vision_run
    fig = plots.best_params_figure(s.get_run(run), s.iterations(run), s.candidates(run))
    assert lines(fig.axes[0]) == {"lm arm": ([-1.0, 0.0, 1.0], [5000.0, 9000.0, 20000.0]),
                                  "random arm": ([-1.0, 0.0], [5000.0, 700.0])}


def trailing_mean(values, window):
    """The moving average the figure promises, written out independently."""
    pts = [(i + 1, v) for i, v in enumerate(values) if v is not None]
    return ([float(x) for x, _ in pts],
            [sum(v for _, v in pts[max(0, k - window + 1):k + 1])
             / len(pts[max(0, k - window + 1):k + 1]) for k in range(len(pts))])


def test_smoothing_is_a_trailing_mean_over_the_finite_values():
    xs, ys = plots.smooth([1.0, None, 3.0, 5.0, 7.0], 2)
    assert (xs, ys) == ([1, 3, 4, 5], [1.0, 2.0, 4.0, 6.0])
    assert plots.smooth([2.0, 4.0], 1) == ([1, 2], [2.0, 4.0])
    assert plots.smooth([], 3) == ([], [])


def test_candidate_losses_figure_plots_the_smoothed_stored_curves(vision_run):
    s, run, ids = vision_run
    seed_curve = [math.sin(i / 5) + 2 for i in range(60)]        # 60 steps: window 2
    chosen = [1.0 / (i + 1) for i in range(50)]
    s.add_curve(run, "fewshot_loss", seed_curve, iteration=0,
                candidate_id=s.iterations(run, arm="lm")[0].incumbent_id)
    s.add_curve(run, "fewshot_loss", chosen, iteration=0, candidate_id=ids[("lm", 0, 1)])
    fig = plots.candidate_losses_figure(s.get_run(run), s.iterations(run), s.candidates(run),
                                        s.curves(run))
    lm_ax = fig.axes[0]
    got = lines(lm_ax)
    stored = {c.candidate_id: c.values for c in s.curves(run, "fewshot_loss")}
    seed_id = s.iterations(run, arm="lm")[0].incumbent_id
    assert set(got) == {"model 0 (seed)", "after iteration 0"}
    for label, cid in (("model 0 (seed)", seed_id), ("after iteration 0", ids[("lm", 0, 1)])):
        xs, ys = trailing_mean(stored[cid], 60 // 25)
        assert got[label][0] == xs
        assert got[label][1] == pytest.approx(ys)


def test_copying_figure_plots_each_arms_stored_rates(lm_run):
    s, run = lm_run
    s.update_iteration(run, 0, lm_p_intact=0.85, lm_copy_accuracy=0.97, single_edit_rate=0.75,
                       repeat_rate=None)
    s.update_iteration(run, 1, lm_p_intact=0.9, lm_copy_accuracy=0.98, single_edit_rate=0.5,
                       repeat_rate=0.25)
    s.ensure_iteration(run, 0, source_in="seed", arm="lineage")
    s.update_iteration(run, 0, arm="lineage", single_edit_rate=1.0, repeat_rate=0.5)
    got = lines(plots.copying_figure(s.get_run(run), s.iterations(run)).axes[0])
    label = {attr: text for attr, text, _ in plots.COPY_SERIES}
    assert got[label["lm_p_intact"]] == ([0.0, 1.0], [0.85, 0.9])
    assert got[label["lm_copy_accuracy"]] == ([0.0, 1.0], [0.97, 0.98])
    assert got[label["single_edit_rate"]] == ([0.0, 1.0], [0.75, 0.5])
    assert got[label["repeat_rate"]] == ([1.0], [0.25])           # null in iteration 0: no point
    assert got[label["single_edit_rate"] + " (lineage)"] == ([0.0], [1.0])
    assert got[label["repeat_rate"] + " (lineage)"] == ([0.0], [0.5])
    assert len(got) == 6


def test_search_figure_plots_best_score_against_evaluations_spent(vision_run):
    s, run, _ = vision_run
    cands = s.candidates(run)
    got = lines(plots.search_figure(s.get_run(run), cands).axes[0])
    # lm: the seed's 0.5 (row 1), 0.8, 0.6, an invalid row, 0.1, then iteration 1's 0.9
    assert got["lm arm"] == ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.5, 0.8, 0.8, 0.8, 0.8, 0.9])
    assert got["random arm"] == ([1.0], [0.55])
    from pipeline.report import best_so_far
    assert best_so_far(cands, "lm", "min")[-1] == (6, 0.1)          # a loss: lower is better
