"""PNG figures of a run, drawn from lineage store views.

Each `*_figure` function takes views (never a store or a session) and returns the
matplotlib Figure (tests read the plotted data back from its lines); each `plot_*`
function draws the same figure into a PNG at a path and returns the path, so new
figures (design parameters per iteration, parameter count of the best model, accuracy
against the number of candidates) slot in beside these.

Figures are drawn on `matplotlib.figure.Figure` objects rather than through pyplot:
no global backend switch and no global figure registry, so this is safe to call from a
worker thread or a process that also uses pyplot for something else. Saving a bare
Figure to .png renders with the Agg backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib import colormaps
from matplotlib.figure import Figure

from pipeline.families import plot_note, plotted
from pipeline.report import direction, task_family
from pipeline.store import CandidateView, CurveView, IterationView, RunView


def score_label(run: RunView) -> str:
    if direction(run.task) == "min":   # self-programming scores are few-shot losses
        return "few-shot training loss (lower is better)"
    return "accuracy (higher is better)"


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def lm_loss_figure(run: RunView, iterations: Sequence[IterationView],
                   curves: Sequence[CurveView] = ()) -> Figure:
    """LM training loss per step, one line per iteration (the paper's Figure 2).

    Uses each iteration's `lm_losses`; falls back to 'lm_loss' metric curves for
    iterations that have none stored on the iteration row.
    """
    series: list[tuple[str, list[float | None]]] = []
    covered: set[int] = set()
    for it in iterations:
        if it.lm_losses:
            label = f"iteration {it.index}" + ("" if it.arm == "lm" else f" ({it.arm})")
            series.append((label, list(it.lm_losses)))
            covered.add(it.index)
    for c in curves:
        if c.name == "lm_loss" and c.values and c.iteration not in covered:
            series.append((f"iteration {c.iteration}", list(c.values)))

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for label, values in series:
        steps = [i for i, v in enumerate(values) if v is not None]
        ax.plot([i + 1 for i in steps], [values[i] for i in steps], label=label, linewidth=1.2)
    if series:
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        _empty(ax, "no LM training loss recorded yet")
    ax.set_xlabel("training step")
    ax.set_ylabel("LM training loss")
    ax.set_title(f"run {run.id}: LM training loss per iteration")
    ax.grid(alpha=0.3)
    return fig


def plot_lm_loss(run: RunView, iterations: Sequence[IterationView], path: Path,
                 curves: Sequence[CurveView] = ()) -> Path:
    """`lm_loss_figure`, written to `path` as a PNG."""
    return _save(lm_loss_figure(run, iterations, curves=curves), path)


def scores_figure(run: RunView, iterations: Sequence[IterationView],
                  candidates: Sequence[CandidateView]) -> Figure:
    """Score of the selected source and of the incumbent, per iteration (one line per arm)."""
    by_id = {c.id: c for c in candidates}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    drawn = False
    for arm in sorted({it.arm for it in iterations}):
        rows = [it for it in iterations if it.arm == arm]
        suffix = "" if arm == "lm" else f" ({arm})"
        for attr, label, style in (("selected_id", "selected", "o-"),
                                   ("incumbent_id", "incumbent", "s--")):
            xs, ys = [], []
            for it in rows:
                cand = by_id.get(getattr(it, attr))
                if cand is not None and cand.score is not None:
                    xs.append(it.index)
                    ys.append(cand.score)
            if xs:
                ax.plot(xs, ys, style, label=label + suffix)
                drawn = True
    if drawn:
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        _empty(ax, "no scored iteration yet")
    ax.set_xlabel("iteration")
    ax.set_ylabel(score_label(run))
    ax.set_title(f"run {run.id}: score per iteration")
    ax.grid(alpha=0.3)
    return fig


def plot_scores(run: RunView, iterations: Sequence[IterationView],
                candidates: Sequence[CandidateView], path: Path) -> Path:
    """`scores_figure`, written to `path` as a PNG."""
    return _save(scores_figure(run, iterations, candidates), path)


COPY_SERIES = (("lm_p_intact", "p_intact (held-out, LM copies every copy token)", "o-"),
               ("lm_copy_accuracy", "copy accuracy (held-out, teacher-forced)", "s--"),
               ("single_edit_rate", "samples changing exactly one parameter", "^-"),
               ("repeat_rate", "samples repeating a move that improved before", "d:"))


def copying_figure(run: RunView, iterations: Sequence[IterationView]) -> Figure:
    """Per iteration: how well the LM copies its input (sandbox/lm_schedule.py) and the
    share of its samples that changed exactly one design parameter (one line per arm
    where it applies: the random arm's samples are single edits by construction)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    drawn = False
    for arm in _arms(iterations):
        rows = [it for it in iterations if it.arm == arm]
        suffix = "" if arm == "lm" else f" ({arm})"
        for attr, label, style in COPY_SERIES:
            pts = [(it.index, getattr(it, attr)) for it in rows if getattr(it, attr) is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=label + suffix)
                drawn = True
    if drawn:
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(-0.02, 1.02)
    else:
        _empty(ax, "no LM trained or sampled yet")
    ax.set_xlabel("iteration")
    ax.set_ylabel("share")
    ax.set_title(f"run {run.id}: does the LM edit its input?")
    ax.grid(alpha=0.3)
    return fig


def plot_copying(run: RunView, iterations: Sequence[IterationView], path: Path) -> Path:
    """`copying_figure`, written to `path` as a PNG."""
    return _save(copying_figure(run, iterations), path)


def plot_run(run: RunView, iterations: Sequence[IterationView],
             candidates: Sequence[CandidateView], curves: Sequence[CurveView],
             out_dir: Path) -> list[Path]:
    """All figures of a run into `out_dir` (created if missing); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_lm_loss(run, iterations, out_dir / "lm_loss.png", curves),
        plot_scores(run, iterations, candidates, out_dir / "score.png"),
        plot_copying(run, iterations, out_dir / "copying.png"),
        plot_search(run, candidates, out_dir / "search.png"),
    ]


def search_figure(run: RunView, candidates: Sequence[CandidateView]) -> Figure:
    """The best score each arm has seen against the evaluations it has spent
    (report.best_so_far): arms compared at equal budget."""
    from pipeline.report import arm_order, best_so_far, direction
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    better = direction(run.task)
    for arm in arm_order(c.arm for c in candidates):
        pts = best_so_far(candidates, arm, better)
        if pts:
            ax.step([n for n, _ in pts], [b for _, b in pts], where="post",
                    label=f"{arm} arm", **_line_style(arm))
    if ax.get_lines():
        ax.legend(fontsize="small")
    else:
        _empty(ax, "nothing scored yet")
    ax.set_xlabel("evaluations spent")
    ax.set_ylabel("best score so far")
    ax.set_title(f"run {run.id} ({run.task}): best score against evaluations")
    ax.grid(alpha=0.3)
    return fig


def plot_search(run: RunView, candidates: Sequence[CandidateView], path: Path) -> Path:
    """`search_figure`, written to `path` as a PNG."""
    return _save(search_figure(run, candidates), path)


# ------------------------------------------------------------- vision runs (paper 4.2)
# Figures for runs where the LM programs another network: loss curves of the selected
# network per iteration (the paper's Figure 3), average design parameters of the
# candidates (Figure 5), parameter count of the best model (Figure 6), and accuracy
# against the total number of candidates over a sweep of runs (Figure 4).

ARM_STYLE = {"lm": dict(color="tab:blue", linestyle="-", marker="o"),
             "random": dict(color="tab:orange", linestyle="--", marker="s"),
             "lineage": dict(color="tab:green", linestyle="-.", marker="^")}


def _line_style(arm: str) -> dict:
    return {k: v for k, v in ARM_STYLE.get(arm, {}).items() if k != "marker"}


def _arms(iterations: Sequence[IterationView]) -> list[str]:
    from pipeline.report import arm_order
    return arm_order(it.arm for it in iterations)


def smooth(values: Sequence[float | None], window: int) -> tuple[list[int], list[float]]:
    """Trailing moving average over the finite values; x is the 1-based step."""
    xs, ys, buf = [], [], []
    for i, v in enumerate(values):
        if v is None:
            continue
        buf.append(v)
        if len(buf) > window:
            buf.pop(0)
        xs.append(i + 1)
        ys.append(sum(buf) / len(buf))
    return xs, ys


def candidate_losses_figure(run: RunView, iterations: Sequence[IterationView],
                            candidates: Sequence[CandidateView],
                            curves: Sequence[CurveView]) -> Figure:
    """Training loss per step of the network each iteration selected (paper Figure 3).

    'model 0' is the seed network (iteration 0's incumbent); 'after iteration k' is the
    network selected at iteration k, as trained during its evaluation (its stored
    'fewshot_loss' curve). One panel per arm; curves are a moving average.
    """
    by_id = {c.id: c for c in candidates}
    losses = {c.candidate_id: c.values for c in curves
              if c.name == "fewshot_loss" and c.candidate_id is not None}
    arms = _arms(iterations) or ["lm"]
    fig = Figure(figsize=(6 * len(arms), 4.5))
    axes = [fig.add_subplot(1, len(arms), i + 1) for i in range(len(arms))]
    longest = max((len(v) for v in losses.values()), default=0)
    window = max(1, longest // 25)
    for ax, arm in zip(axes, arms):
        rows = sorted((it for it in iterations if it.arm == arm), key=lambda it: it.index)
        series = []
        if rows and rows[0].incumbent_id in losses:
            series.append(("model 0 (seed)", losses[rows[0].incumbent_id]))
        for it in rows:
            if it.selected_id in losses:
                chosen = by_id.get(it.selected_id)
                kept = " (kept)" if chosen is not None and chosen.role == "incumbent" else ""
                series.append((f"after iteration {it.index}{kept}", losses[it.selected_id]))
        for n, (label, values) in enumerate(series):
            xs, ys = smooth(values, window)
            color = colormaps["viridis"](0.9 * n / max(1, len(series) - 1))
            ax.plot(xs, ys, label=label, linewidth=1.3, color=color,
                    linestyle="--" if label.endswith("(kept)") else "-")
        if series:
            ax.legend(fontsize="small")
        else:
            _empty(ax, "no loss curve recorded yet")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.set_title(f"{arm} arm" + (f" (moving average, {window} steps)" if window > 1 else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(f"run {run.id} ({run.task}): training loss of the selected network")
    return fig


def plot_candidate_losses(run: RunView, iterations: Sequence[IterationView],
                          candidates: Sequence[CandidateView], curves: Sequence[CurveView],
                          path: Path) -> Path:
    """`candidate_losses_figure`, written to `path` as a PNG."""
    return _save(candidate_losses_figure(run, iterations, candidates, curves), path)


def design_averages(candidates: Sequence[CandidateView], arm: str,
                    shown: Sequence[tuple[str, str, bool]]) -> dict[int, dict[str, float]]:
    """Per iteration, the mean of each shown design parameter (families.plotted: param,
    label, log2) over the arm's evaluated candidates. Iterations with no evaluated
    candidate are left out."""
    import math

    out: dict[int, dict[str, float]] = {}
    for index in sorted({c.iteration for c in candidates if c.arm == arm}):
        designs = [c.design for c in candidates
                   if c.arm == arm and c.iteration == index and c.role == "candidate"
                   and c.status == "evaluated" and c.design]
        designs = [d for d in designs if all(isinstance(d.get(k), int) and d[k] >= (1 if log else 0)
                                             for k, _, log in shown)]
        if designs:
            out[index] = {k: sum(math.log2(d[k]) if log else d[k] for d in designs) / len(designs)
                          for k, _, log in shown}
            out[index]["n"] = len(designs)
    return out


def design_params_figure(run: RunView, iterations: Sequence[IterationView],
                         candidates: Sequence[CandidateView]) -> Figure:
    """Average design parameters of the evaluated candidates per iteration (paper
    Figure 5): one panel per parameter the run's family shows (families.plotted), one
    line per arm."""
    family = task_family(run.task)
    shown = plotted(family)
    rows = max(1, (len(shown) + 1) // 2)
    fig = Figure(figsize=(10, 3.5 * rows))
    axes = [fig.add_subplot(rows, 2, i + 1) for i in range(len(shown))]
    arms = _arms(iterations) or ["lm"]
    averages = {arm: design_averages(candidates, arm, shown) for arm in arms}
    for ax, (key, label, _) in zip(axes, shown):
        drawn = False
        for arm in arms:
            pts = averages[arm]
            if pts:
                xs = list(pts)
                ax.plot(xs, [pts[x][key] for x in xs], label=f"{arm} arm", **ARM_STYLE.get(arm, {}))
                drawn = True
        if drawn:
            ax.legend(fontsize="small")
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            _empty(ax, "no evaluated candidate yet")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"avg {label}")
        ax.grid(alpha=0.3)
    if not shown:
        _empty(fig.add_subplot(), f"no design parameters known for task {run.task!r}")
    note = plot_note(family)
    fig.suptitle(f"run {run.id} ({run.task}): average design of the evaluated candidates"
                 + (f" ({note})" if note else ""), fontsize="medium")
    return fig


def plot_design_params(run: RunView, iterations: Sequence[IterationView],
                       candidates: Sequence[CandidateView], path: Path) -> Path:
    """`design_params_figure`, written to `path` as a PNG."""
    return _save(design_params_figure(run, iterations, candidates), path)


def best_params_figure(run: RunView, iterations: Sequence[IterationView],
                       candidates: Sequence[CandidateView]) -> Figure:
    """Parameter count of the selected (best) model per iteration (paper Figure 6);
    the seed network's count is the first point ('seed')."""
    by_id = {c.id: c for c in candidates}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    drawn = False
    for arm in _arms(iterations):
        rows = sorted((it for it in iterations if it.arm == arm), key=lambda it: it.index)
        xs, ys = [], []
        seed = by_id.get(rows[0].incumbent_id) if rows else None
        if seed is not None and seed.param_count:
            xs.append(-1)
            ys.append(seed.param_count)
        for it in rows:
            c = by_id.get(it.selected_id)
            if c is not None and c.param_count:
                xs.append(it.index)
                ys.append(c.param_count)
        if xs:
            ax.plot(xs, ys, label=f"{arm} arm", **ARM_STYLE.get(arm, {}))
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize="small")
        last = max((it.index for it in iterations), default=0)
        ax.set_xticks(range(-1, last + 1), ["seed"] + [str(i) for i in range(last + 1)])
    else:
        _empty(ax, "no selected model yet")
    ax.set_xlabel("iteration")
    ax.set_ylabel("parameters of the selected model")
    ax.set_title(f"run {run.id} ({run.task}): size of the best model")
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_best_params(run: RunView, iterations: Sequence[IterationView],
                     candidates: Sequence[CandidateView], path: Path) -> Path:
    """`best_params_figure`, written to `path` as a PNG."""
    return _save(best_params_figure(run, iterations, candidates), path)


def plot_vision_run(run: RunView, iterations: Sequence[IterationView],
                    candidates: Sequence[CandidateView], curves: Sequence[CurveView],
                    out_dir: Path) -> list[Path]:
    """The figures of a run that programs another network, into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_candidate_losses(run, iterations, candidates, curves, out_dir / "candidate_loss.png"),
        plot_design_params(run, iterations, candidates, out_dir / "design_params.png"),
        plot_best_params(run, iterations, candidates, out_dir / "best_params.png"),
        plot_copying(run, iterations, out_dir / "copying.png"),
        plot_search(run, candidates, out_dir / "search.png"),
    ]


def sweep_figure(task: str, rows: Sequence[dict]) -> Figure:
    """Accuracy against the total number of candidates (paper Figure 4).

    `rows`: one per sweep cell, with keys candidates, iterations, and end accuracy per
    arm (one key per arm name, pipeline/proposers/; None when missing). Left: accuracy against candidates x
    iterations (points, and the mean per total as a line). Right: accuracy against
    candidates per iteration, one line per number of iterations.
    """
    fig = Figure(figsize=(12, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    from pipeline.proposers import names
    arms = [a for a in names() if any(r.get(a) is not None for r in rows)]
    for arm in arms:
        style = ARM_STYLE.get(arm, {})
        pts = sorted((r["candidates"] * r["iterations"], r[arm]) for r in rows if r.get(arm) is not None)
        left.scatter([p[0] for p in pts], [p[1] for p in pts], color=style.get("color"),
                     marker=style.get("marker", "o"), alpha=0.6)
        totals = sorted({p[0] for p in pts})
        means = [sum(a for t, a in pts if t == x) / sum(1 for t, _ in pts if t == x) for x in totals]
        left.plot(totals, means, color=style.get("color"), linestyle=style.get("linestyle"),
                  label=f"{arm} arm (mean per total)")
        for iters in sorted({r["iterations"] for r in rows}):
            cells = sorted((r["candidates"], r[arm]) for r in rows
                           if r["iterations"] == iters and r.get(arm) is not None)
            if cells:
                right.plot([c[0] for c in cells], [c[1] for c in cells],
                           color=style.get("color"), marker=style.get("marker", "o"),
                           linestyle=style.get("linestyle"),
                           alpha=0.35 + 0.65 * iters / max(r["iterations"] for r in rows),
                           label=f"{arm}, {iters} iteration{'s' if iters != 1 else ''}")
    for ax in (left, right):
        ax.set_ylabel("final accuracy of the selected model")
        ax.grid(alpha=0.3)
        if arms:
            ax.legend(fontsize="small")
        else:
            _empty(ax, "no finished sweep cell yet")
    left.set_xlabel("total candidates (candidates per iteration x iterations)")
    right.set_xlabel("candidates per iteration")
    right.set_xticks(sorted({r["candidates"] for r in rows}) or [0])
    fig.suptitle(f"{task}: accuracy against the number of candidates (sweep)")
    return fig


def plot_sweep(task: str, rows: Sequence[dict], path: Path) -> Path:
    """`sweep_figure`, written to `path` as a PNG."""
    return _save(sweep_figure(task, rows), path)

