"""The figures' geometry (pipeline/web/figures.py) on lineages written through the store
API: every coordinate inside its plot, degenerate ranges drawn, the selected path the
store's own lineage of the last winner."""
from __future__ import annotations

import math
import random

from pipeline.store import LineageStore
from pipeline.web import figures
from pipeline.web.app import diff_lines
from tests.support.lineage import SEED, add_iteration, fill_run


def _inside(axes: figures.Axes, x: float, y: float) -> bool:
    return (axes.plot_left - 1e-6 <= x <= axes.plot_right + 1e-6
            and axes.plot_top - 1e-6 <= y <= axes.plot_bottom + 1e-6)


def test_figures_of_a_finished_run(sqlite_url):
    with LineageStore(sqlite_url, create=True) as store:
        run_id = fill_run(store, iterations=4, candidates=6)
        its, cands = store.iterations(run_id), store.candidates(run_id)
        winners = {arm: store.get_iteration(run_id, 3, arm).selected_id for arm in ("lm", "random")}
        expected = {c.id for w in winners.values() for c in store.lineage(w)}

    assert figures.selected_path(its, cands) == expected
    tree = figures.candidate_tree(its, cands, "min")
    assert len(tree["nodes"]) == len(cands)
    assert {n.id for n in tree["nodes"] if n.on_path} == expected
    # an edge per candidate with a parent, drawn from the parent's node to the child's
    pos = {n.id: (n.x, n.y) for n in tree["nodes"]}
    assert len(tree["edges"]) == sum(c.parent_id is not None for c in cands)
    for e in tree["edges"]:
        assert 0 < e.x1 < e.x2 <= tree["width"] and 0 < e.y2 <= tree["height"]
    for c in cands:
        if c.parent_id is not None:
            assert pos[c.parent_id][0] < pos[c.id][0]
    # the best score is green, the worst red, under "min" (a loss)
    scored = [c for c in cands if c.status == "evaluated"]
    best, worst = min(scored, key=lambda c: c.score), max(scored, key=lambda c: c.score)
    fill = {n.id: n.fill for n in tree["nodes"]}
    assert fill[best.id] == "hsl(120, 70%, 45%)" and fill[worst.id] == "hsl(0, 70%, 45%)"
    assert all(fill[c.id] == figures.STATUS_FILL["invalid"] for c in cands
               if c.status == "invalid")

    scores = figures.score_chart(its, cands)
    assert len(scores["dots"]) == len(scored)
    assert all(_inside(scores["axes"], d["x"], d["y"]) for d in scores["dots"])
    assert {line["arm"] for line in scores["lines"]} == {"lm", "random"}
    loss = figures.lm_loss_chart(its)
    assert [line["iteration"] for line in loss["lines"]] == [0, 1, 2, 3]
    for line in loss["lines"]:
        for point in line["points"].split():
            assert _inside(loss["axes"], *map(float, point.split(",")))


def test_figures_of_a_run_just_started(sqlite_url):
    with LineageStore(sqlite_url, create=True) as store:
        run_id = store.create_run(config={}, task="self", preset="quick", seed=0)
        assert figures.candidate_tree([], [], "min") is None
        assert figures.score_chart([], []) is None
        add_iteration(store, run_id, 0, SEED, None, 0, random.Random(0), finish=False)
        store.update_iteration(run_id, 0, lm_losses=[None, 2.0, None])
        its, cands = store.iterations(run_id), store.candidates(run_id)
    # one score, one loss: the ranges are degenerate and still drawn
    scores = figures.score_chart(its, cands)
    assert len(scores["dots"]) == 1 and _inside(scores["axes"], scores["dots"][0]["x"],
                                                 scores["dots"][0]["y"])
    loss = figures.lm_loss_chart(its)
    assert loss["lines"][0]["points"].count(",") == 1
    tree = figures.candidate_tree(its, cands, "max")
    assert len(tree["nodes"]) == 1 and not tree["edges"]


def test_ticks_are_round_and_cover_the_range():
    for lo, hi in ((0, 1), (0.37, 0.41), (3.0, 5000.0), (-2.5, 2.5), (1e-4, 3e-4)):
        ticks = figures._ticks(lo, hi)
        assert 2 <= len(ticks) <= 11, (lo, hi, ticks)
        assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
        steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
        assert len(steps) == 1
        step = steps.pop()
        assert round(step / 10 ** math.floor(math.log10(step)), 9) in (1, 2, 5), ticks


def test_diff_lines_classify_by_a_fixed_set_of_words():
    diff = "--- a\n+++ b\n@@ -1 +1 @@\n-old\n+new <script>\n same\n"
    assert diff_lines(diff) == [("meta", "--- a"), ("meta", "+++ b"), ("meta", "@@ -1 +1 @@"),
                                ("del", "-old"), ("add", "+new <script>"), ("ctx", " same")]
