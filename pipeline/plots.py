"""PNG figures of a run, drawn from lineage store views.

Each function takes views (never a store or a session) and a path, writes one PNG and
returns its path, so new figures (design parameters per iteration, parameter count of
the best model, accuracy against the number of candidates) slot in beside these.

Figures are drawn on `matplotlib.figure.Figure` objects rather than through pyplot:
no global backend switch and no global figure registry, so this is safe to call from a
worker thread or a process that also uses pyplot for something else. Saving a bare
Figure to .png renders with the Agg backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from pipeline.store import CandidateView, CurveView, IterationView, RunView

LOWER_IS_BETTER_TASKS = ("self",)   # self-programming scores are few-shot losses


def score_label(run: RunView) -> str:
    if run.task in LOWER_IS_BETTER_TASKS:
        return "few-shot training loss (lower is better)"
    return "accuracy (higher is better)"


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_lm_loss(run: RunView, iterations: Sequence[IterationView], path: Path,
                 curves: Sequence[CurveView] = ()) -> Path:
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
    return _save(fig, path)


def plot_scores(run: RunView, iterations: Sequence[IterationView],
                candidates: Sequence[CandidateView], path: Path) -> Path:
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
    return _save(fig, path)


def plot_run(run: RunView, iterations: Sequence[IterationView],
             candidates: Sequence[CandidateView], curves: Sequence[CurveView],
             out_dir: Path) -> list[Path]:
    """All figures of a run into `out_dir` (created if missing); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_lm_loss(run, iterations, out_dir / "lm_loss.png", curves),
        plot_scores(run, iterations, candidates, out_dir / "score.png"),
    ]
