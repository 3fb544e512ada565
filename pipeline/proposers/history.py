"""What a run's lineage says about the moves it tried: every evaluated candidate of an
arm's finished iterations, next to its parent (that iteration's incumbent), with the
single move it made and how much it gained. The lineage proposer learns from these;
the loop records how often an iteration repeats a move that gained before."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline import refinement


@dataclass(frozen=True)
class Edit:
    iteration: int
    parent_source: str
    child_source: str
    parent_design: dict | None
    child_design: dict | None
    parent_score: float
    child_score: float
    direction: str          # "max" (accuracy) or "min" (loss)

    def advantage(self) -> float:
        """The child's gain over its parent, positive when it is better."""
        gain = self.child_score - self.parent_score
        return gain if self.direction == "max" else -gain


def move(family, parent: dict | None, child: dict | None) -> tuple[str, str] | None:
    """(parameter, "+" or "-") when the child moves exactly one design parameter."""
    if refinement.edits(family, parent, child) != 1:
        return None
    p = next(p for p in family.PARAMS if parent.get(p) != child.get(p))
    return p, "+" if child[p] > parent[p] else "-"


def edits(store, run_id: str, arm: str, before: int, direction: str) -> list[Edit]:
    """The scored candidates of `arm`'s iterations before `before` (flagged ones left out:
    their score did not reproduce)."""
    out = []
    for index in range(before):
        rows = store.candidates(run_id, iteration=index, arm=arm)
        parent = next((c for c in rows if c.role == "incumbent"), None)
        if parent is None or parent.score is None:
            continue
        for c in rows:
            if c.role == "candidate" and c.status == "evaluated" and c.score is not None \
                    and not c.flagged:
                out.append(Edit(index, parent.source, c.source, parent.design, c.design,
                                parent.score, c.score, direction))
    return out


def improving_moves(family, history: list[Edit]) -> set[tuple[str, str]]:
    return {m for e in history if e.advantage() > 0
            and (m := move(family, e.parent_design, e.child_design)) is not None}


def repeat_rate(family, parent: dict | None, designs: list[dict | None],
                improving: set[tuple[str, str]]) -> float | None:
    """The share of drawn samples whose move from `parent` is one that improved before
    (None before anything improved, or without samples)."""
    if not designs or not improving:
        return None
    return sum(move(family, parent, d) in improving for d in designs) / len(designs)
