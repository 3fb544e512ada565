"""The proposers: what writes an iteration's candidates from its parent source. Each arm
of a run is one proposer, named by the arm; the rest of the loop (pipeline/stages.py)
reaches a proposer only through this registry and the attributes below.

    lm        the paper's: the LM trained on random refinements samples n refinements
    random    the control arm: n random single-parameter refinements, no LM
    lineage   the LM of `lm`, briefly fine-tuned on the run's own improving edits first

What a proposer module provides:

    NAME               the arm name stored in the lineage DB (NAME_PATTERN)
    USES_LM            whether an iteration first trains the LM its source defines (the
                       `training` stage; trained once per run for a vision task)
    job(request)       the sandbox job that draws the samples (a `generate` job on the
                       trainer queue), or None when the proposer draws them itself
    propose(request, result) -> Proposal
                       the drawn sources (request.n of them, unparsed) and what to record
                       about them; `result` is the job's sandbox Result (None without a job,
                       or when the job failed: then the proposal may be empty)

Adding a proposer: one module with these names and one `register(module)` line below;
`--set arms=lm,<name>` runs it beside the others (tests/pipeline/test_proposers.py shows a
toy one).
"""
from __future__ import annotations

import re
from types import ModuleType
from typing import Any

from pipeline.proposers import lineage, lm, random_refinement
from pipeline.proposers.base import Proposal, Request

REQUIRED = ("NAME", "USES_LM", "job", "propose")
# Arm names travel in job ids, directory names and the DB's 16-character arm column.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,15}$")

PROPOSERS: dict[str, Any] = {}


class UnknownProposer(ValueError):
    pass


def register(proposer: ModuleType | Any) -> Any:
    """Add a proposer (a module or any object with the REQUIRED attributes); returns it."""
    missing = [a for a in REQUIRED if not hasattr(proposer, a)]
    if missing:
        raise TypeError(f"proposer {getattr(proposer, 'NAME', proposer)!r} lacks {', '.join(missing)}")
    if not NAME_PATTERN.match(proposer.NAME):
        raise ValueError(f"proposer name {proposer.NAME!r} must match {NAME_PATTERN.pattern}")
    PROPOSERS[proposer.NAME] = proposer
    return proposer


def unregister(name: str) -> None:
    PROPOSERS.pop(name, None)


def get_proposer(name: str) -> Any:
    try:
        return PROPOSERS[name]
    except KeyError:
        raise UnknownProposer(f"unknown arm {name!r}; arms: {', '.join(PROPOSERS)}") from None


def names() -> tuple[str, ...]:
    """The registered arms, in registration order (the order tables and plots use)."""
    return tuple(PROPOSERS)


__all__ = ["Proposal", "Request", "register", "unregister", "get_proposer", "names",
           "UnknownProposer", "NAME_PATTERN"]

register(lm)
register(random_refinement)
register(lineage)
