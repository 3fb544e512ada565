"""Declarations the trusted side derives instead of running a `declare` sandbox.

A self-task candidate's code runs once, in a sandbox of its own, to declare its model
and learning dynamics (sandbox/runner.py). Most LM-written candidates, though, are byte
for byte the family's own rendering of a design (`render`, with five numbers filled
in): running them can only declare what that rendering declares. So once one rendering
has been declared for real, the declaration of every other rendering follows from its
design (`derived_declaration` of the family), and its declare sandbox (a second
interpreter importing torch and transformers, bench/bench_declare.py) is skipped.

Nothing of a candidate is trusted here: a source that is not exactly a rendering, or
whose derived declaration falls outside the schema's bounds, goes through the real
declare step. A rendering is learnt only if deriving its own declaration from its own
design gives back exactly what its sandbox declared, so a change of the template that
the derivation does not follow turns the shortcut off instead of making it wrong.
"""
from __future__ import annotations

import json
import threading
from typing import Any

from sandbox.schema import Declaration, SchemaError


class Templates:
    """One family's real declaration of a rendering per set of declare parameters
    (vocabulary size, parameter cap, ...), and what follows from it."""

    def __init__(self, family: Any):
        self.family = family
        self._known: dict[str, tuple[Any, dict]] = {}
        self._lock = threading.Lock()
        self.derived = 0              # declare sandboxes saved (benchmarks, tests)

    @staticmethod
    def _key(params: dict) -> str:
        return json.dumps(params, sort_keys=True)

    def learn(self, source: str, params: dict, declaration: dict) -> None:
        """After a real declare job of `source` (with `params`) declared `declaration`."""
        design = self.family.template_design(source, declaration)
        if design is None or self.family.derived_declaration(declaration, design) != declaration:
            return
        with self._lock:
            self._known[self._key(params)] = (design, declaration)

    def derive(self, source: str, params: dict) -> dict | None:
        """The declaration of `source` without running it, or None (then declare it)."""
        with self._lock:
            known = self._known.get(self._key(params))
        if known is None:
            return None
        design = self.family.template_design(source, known[1])
        if design is None:
            return None
        declaration = self.family.derived_declaration(known[1], design)
        try:
            Declaration.from_dict(json.loads(json.dumps(declaration)))
        except SchemaError:
            return None          # the real declare step says why, as for any candidate
        with self._lock:
            self.derived += 1
        return declaration


def templates_for(families: dict[str, Any]) -> dict[str, Templates]:
    """A Templates per model kind whose family can derive declarations."""
    return {f.MODEL_KIND: Templates(f) for f in families.values()
            if hasattr(f, "template_design") and hasattr(f, "derived_declaration")}
