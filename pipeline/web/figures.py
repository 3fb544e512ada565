"""The geometry of the web view's figures, drawn as plain SVG by the templates.

Everything here is numbers and fixed words (statuses, arms): no candidate text reaches
an SVG attribute, so the figures need no script and pass a strict Content-Security-Policy.
The templates (pipeline/web/templates/) only place what these functions computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from pipeline.store import CandidateView, IterationView

# Fill of a node whose candidate has no score: the status says why.
STATUS_FILL = {"pending": "#ffffff", "running": "#fde68a", "rejected": "#9ca3af",
               "invalid": "#6b7280", "timeout": "#7c3aed", "oom": "#a21caf",
               "cancelled": "#d1d5db", "evaluated": "#60a5fa"}
ARM_COLOUR = {"lm": "#2563eb", "random": "#ea580c"}
MAX_POINTS = 400     # a curve is thinned to this many points: a browser draws no more


@dataclass
class Axes:
    """A plot area mapping data (x, y) to pixels, with round tick values."""
    x0: float
    x1: float
    y0: float
    y1: float
    width: int = 640
    height: int = 260
    left: int = 56
    right: int = 12
    top: int = 12
    bottom: int = 32
    xticks: list[tuple[float, str]] = field(default_factory=list)
    yticks: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        if self.y1 <= self.y0:
            pad = abs(self.y0) * 0.05 or 1.0
            self.y0, self.y1 = self.y0 - pad, self.y1 + pad
        self.xticks = [(self.px(v), _label(v)) for v in _ticks(self.x0, self.x1)]
        self.yticks = [(self.py(v), _label(v)) for v in _ticks(self.y0, self.y1)]

    @property
    def plot_left(self) -> int:
        return self.left

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def plot_top(self) -> int:
        return self.top

    @property
    def plot_bottom(self) -> int:
        return self.height - self.bottom

    def px(self, x: float) -> float:
        return round(self.left + (x - self.x0) / (self.x1 - self.x0)
                     * (self.width - self.left - self.right), 1)

    def py(self, y: float) -> float:
        return round(self.height - self.bottom - (y - self.y0) / (self.y1 - self.y0)
                     * (self.height - self.top - self.bottom), 1)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]


def _label(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.2g}"


def _thin(values: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(values) <= MAX_POINTS:
        return list(values)
    stride = len(values) / MAX_POINTS
    return [values[int(i * stride)] for i in range(MAX_POINTS)] + [values[-1]]


def lm_loss_chart(iterations: Sequence[IterationView]) -> dict[str, Any] | None:
    """The LM's training loss per step, one line per iteration (the paper's Figure 2)."""
    curves = [(it.index, [(step, loss) for step, loss in enumerate(it.lm_losses or [])
                          if loss is not None and math.isfinite(loss)])
              for it in iterations if it.arm == "lm"]
    curves = [(index, points) for index, points in curves if points]
    if not curves:
        return None
    ys = [y for _, points in curves for _, y in points]
    axes = Axes(0, max(x for _, points in curves for x, _ in points), min(ys), max(ys))
    last = max(index for index, _ in curves) or 1
    lines = []
    for index, points in curves:
        # later iterations darker: the figure reads left to right as the run went on
        shade = 30 + int(50 * (1 - index / last))
        lines.append({"iteration": index, "colour": f"hsl(220, 70%, {shade}%)",
                      "points": " ".join(f"{axes.px(x)},{axes.py(y)}"
                                         for x, y in _thin(points))})
    return {"axes": axes, "lines": lines}


def score_chart(iterations: Sequence[IterationView],
                candidates: Sequence[CandidateView]) -> dict[str, Any] | None:
    """Every candidate's score per iteration (dots), and the selected source's score
    per iteration (a line per arm)."""
    scored = [c for c in candidates if c.score is not None and math.isfinite(c.score)]
    if not scored:
        return None
    by_id = {c.id: c for c in candidates}
    ys = [c.score for c in scored]
    axes = Axes(-0.5, max(c.iteration for c in scored) + 0.5, min(ys), max(ys))
    # the arms side by side within an iteration, so their dots do not hide each other
    offset = {"lm": -0.12, "random": 0.12}
    dots = [{"x": axes.px(c.iteration + offset.get(c.arm, 0)), "y": axes.py(c.score),
             "arm": c.arm, "colour": ARM_COLOUR.get(c.arm, "#444"), "id": c.id,
             "incumbent": c.role == "incumbent"} for c in scored]
    lines = []
    for arm in sorted({it.arm for it in iterations}, key=lambda a: (a != "lm", a)):
        points = []
        for it in sorted((it for it in iterations if it.arm == arm), key=lambda it: it.index):
            selected = by_id.get(it.selected_id)
            if selected is not None and selected.score is not None:
                points.append((axes.px(it.index + offset.get(arm, 0)), axes.py(selected.score)))
        if points:
            lines.append({"arm": arm, "colour": ARM_COLOUR.get(arm, "#444"),
                          "points": " ".join(f"{x},{y}" for x, y in points)})
    axes.xticks = [(axes.px(i), str(i)) for i in range(int(axes.x1 + 0.5))]
    return {"axes": axes, "dots": dots, "lines": lines}


def compare_chart(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> dict[str, Any] | None:
    """The selected score per iteration of several runs' lm arms (iteration rows of
    pipeline/report.py), one line each."""
    palette = ("#2563eb", "#dc2626", "#16a34a", "#9333ea")
    series = [(label, [(r["index"], r["score"]) for r in rows
                       if r["arm"] == "lm" and r["score"] is not None])
              for label, rows in runs]
    points = [p for _, s in series for p in s]
    if not points:
        return None
    axes = Axes(-0.5, max(x for x, _ in points) + 0.5, min(y for _, y in points),
                max(y for _, y in points))
    axes.xticks = [(axes.px(i), str(i)) for i in range(int(axes.x1 + 0.5))]
    lines = [{"label": label, "colour": palette[i % len(palette)],
              "points": " ".join(f"{axes.px(x)},{axes.py(y)}" for x, y in s),
              "dots": [(axes.px(x), axes.py(y)) for x, y in s]}
             for i, (label, s) in enumerate(series)]
    return {"axes": axes, "lines": lines}


@dataclass(frozen=True, slots=True)
class Node:
    """A candidate in the tree. Attributes, not a dict: the template reads a thousand
    of them, and Jinja finds an attribute at once where a key costs it an exception."""
    id: int
    x: float
    y: float
    status: str
    score: float | None
    iteration: int
    index: int
    arm: str
    fill: str
    on_path: bool
    incumbent: bool


@dataclass(frozen=True, slots=True)
class Edge:
    x1: float
    y1: float
    x2: float
    y2: float
    on_path: bool


def selected_path(iterations: Sequence[IterationView],
                  candidates: Sequence[CandidateView]) -> set[int]:
    """The ids on each arm's path from its seed to the source its last finished
    iteration selected (the ancestry the run kept)."""
    by_id = {c.id: c for c in candidates}
    path: set[int] = set()
    for arm in {it.arm for it in iterations}:
        done = sorted((it for it in iterations if it.arm == arm and it.selected_id),
                      key=lambda it: it.index)
        node = by_id.get(done[-1].selected_id) if done else None
        while node is not None and node.id not in path:
            path.add(node.id)
            node = by_id.get(node.parent_id)
    return path


def score_fill(score: float, lo: float, hi: float, direction: str) -> str:
    """Red (worst) through yellow to green (best) by where the score lies in the run."""
    t = 0.5 if hi <= lo else (score - lo) / (hi - lo)
    if direction == "min":
        t = 1 - t
    return f"hsl({round(120 * t)}, 70%, 45%)"


def candidate_tree(iterations: Sequence[IterationView], candidates: Sequence[CandidateView],
                   direction: str) -> dict[str, Any] | None:
    """The candidate tree: a column per iteration, a band per arm, an edge from each
    parent to its child; nodes filled by score (evaluated) or by status; the selected
    path drawn bold."""
    if not candidates:
        return None
    dx, dy, margin, label_h = 110, 16, 28, 18
    arms = sorted({c.arm for c in candidates}, key=lambda a: (a != "lm", a))
    path = selected_path(iterations, candidates)
    scores = [c.score for c in candidates
              if c.status == "evaluated" and c.score is not None and math.isfinite(c.score)]
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 0.0)
    pos: dict[int, tuple[float, float]] = {}
    bands = []
    top = margin
    for arm in arms:
        mine = [c for c in candidates if c.arm == arm]
        rows = max(c.index for c in mine) + 1
        bands.append({"arm": arm, "y": top - 8})
        for c in mine:
            # an iteration's children half a column right of its incumbent, so the
            # edges fan out instead of running down one column
            x = margin + 20 + c.iteration * dx + (dx // 2 if c.index else 0)
            pos[c.id] = (x, top + label_h + c.index * dy)
        top += label_h + rows * dy + margin
    nodes = []
    for c in candidates:
        x, y = pos[c.id]
        evaluated = c.status == "evaluated" and c.score is not None and math.isfinite(c.score)
        nodes.append(Node(id=c.id, x=x, y=y, status=c.status, score=c.score,
                          iteration=c.iteration, index=c.index, arm=c.arm,
                          fill=score_fill(c.score, lo, hi, direction) if evaluated
                          else STATUS_FILL.get(c.status, "#ffffff"),
                          on_path=c.id in path, incumbent=c.role == "incumbent"))
    edges = [Edge(x1=pos[c.parent_id][0], y1=pos[c.parent_id][1], x2=pos[c.id][0],
                  y2=pos[c.id][1], on_path=c.id in path and c.parent_id in path)
             for c in candidates if c.parent_id in pos]
    # path edges last, so they are drawn over the others
    edges.sort(key=lambda e: e.on_path)
    columns = max(c.iteration for c in candidates) + 1
    return {"width": margin * 2 + 40 + (columns - 1) * dx + dx // 2, "height": top,
            "nodes": nodes, "edges": edges, "bands": bands,
            "columns": [{"x": margin + 20 + i * dx, "label": i} for i in range(columns)]}
