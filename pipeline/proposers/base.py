"""What a proposer is asked and what it answers (the interface: pipeline/proposers/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    """What a proposer is asked: n sources for iteration `index` of `arm`, from `parent`."""
    ctx: Any          # pipeline.jobs.RunContext: the run's config, task, family, files
    arm: str
    index: int
    parent: str       # the iteration's incumbent source
    n: int            # how many to draw (candidates x sample_factor)


@dataclass
class Proposal:
    samples: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)   # iteration columns to record
