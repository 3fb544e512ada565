"""The selection rule (pipeline/selection.py): the incumbent is kept unless a candidate
is strictly better. In the fast tier (Makefile `test-fast`): a rule that never replaces
would pass every end-to-end run whose candidates all lose."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline import selection
from pipeline.store import CandidateView


def _row(index, status, score, role="candidate"):
    fields = {f.name: None for f in dataclasses.fields(CandidateView)}
    fields.update(id=index + 100, index=index, status=status, score=score, role=role)
    return CandidateView(**fields)


def test_selection_keeps_the_original_unless_a_candidate_is_strictly_better():
    inc = _row(0, "evaluated", 2.0, "incumbent")
    worse = [_row(1, "evaluated", 2.5), _row(2, "invalid", None), _row(3, "evaluated", 2.0)]
    assert selection.select(inc, worse, "min") == (inc, "kept")
    better = worse + [_row(4, "evaluated", 1.5), _row(5, "evaluated", 1.5)]
    assert selection.select(inc, better, "min") == (better[3], "replaced")   # ties: lowest index
    assert selection.select(inc, [_row(1, "evaluated", 3.0)], "max")[1] == "replaced"
    assert selection.select(inc, [], "min") == (inc, "kept")
    broken = _row(0, "timeout", None, "incumbent")
    assert selection.select(broken, worse, "min") == (worse[2], "replaced")


def test_an_accuracy_is_better_higher_and_a_tie_keeps_the_incumbent():
    inc = _row(0, "evaluated", 0.5, "incumbent")
    assert selection.select(inc, [_row(1, "evaluated", 0.5), _row(2, "evaluated", 0.4)],
                            "max") == (inc, "kept")
    best = _row(3, "evaluated", 0.9)
    assert selection.select(inc, [_row(1, "evaluated", 0.6), best], "max") == (best, "replaced")
    with pytest.raises(ValueError, match="direction"):
        selection.select(inc, [best], "up")
