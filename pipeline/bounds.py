"""How a configuration field's bound reads and what it says when a value is outside it:
`Range` for a number, `Rule` for anything else. The bounds themselves are settings.py's
RUN_BOUNDS; each `problem` is one line for the user, or None."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sandbox.schema import JOB_PARAMS


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi (lo < value when `open_lo`), for an int or a float field."""
    lo: float
    hi: float
    open_lo: bool = False

    def problem(self, name: str, value: Any, typ: str) -> str | None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if typ == "int" and not isinstance(value, int):
            number = False        # 2.5 iterations, not rounded to something
        if number and (self.lo < value if self.open_lo else self.lo <= value) \
                and value <= self.hi:            # NaN fails both comparisons
            return None
        kind = "an integer" if typ == "int" else "a number"
        return (f"{name} must be {kind} in {'(' if self.open_lo else '['}{_num(self.lo)}, "
                f"{_num(self.hi)}], got {value!r}")


@dataclass(frozen=True)
class Rule:
    """A bound for a field that is not a number: `check(value)` says what is wrong."""
    check: Callable[[Any], str | None]

    def problem(self, name: str, value: Any, typ: str) -> str | None:
        return self.check(value)


def job_bound(param: str) -> Range:
    """A sandbox job parameter's own bound (sandbox/schema.py JOB_PARAMS), for a field
    that becomes that parameter: no run starts that its first such job would refuse."""
    _, lo, hi = JOB_PARAMS[param]
    return Range(lo, hi)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
