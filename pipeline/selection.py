"""The selection rule of the loop (the paper's Algorithm 1, last step), as a pure function."""
from __future__ import annotations

from typing import Protocol, Sequence, TypeVar


class Scored(Protocol):
    status: str
    score: float | None
    index: int


C = TypeVar("C", bound=Scored)


def select(incumbent: C, candidates: Sequence[C], direction: str) -> tuple[C, str]:
    """c <- argbest score(c_i); keep c unless a candidate is strictly better.

    `direction` is "min" (a loss) or "max" (an accuracy). Only evaluated candidates
    compete (errors discard a candidate). Ties keep the incumbent; among equal
    candidates the lowest index wins, so selection is repeatable.
    """
    if direction not in ("min", "max"):
        raise ValueError(f"direction must be 'min' or 'max', got {direction!r}")
    scored = [c for c in candidates if c.status == "evaluated" and c.score is not None]
    if not scored:
        return incumbent, "kept"
    sign = 1 if direction == "min" else -1
    best = min(scored, key=lambda c: (sign * c.score, c.index))
    if incumbent.status != "evaluated" or incumbent.score is None:
        return best, "replaced"
    return (best, "replaced") if sign * best.score < sign * incumbent.score else (incumbent, "kept")
