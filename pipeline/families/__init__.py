"""The family registry: each family of model sources the LM learns to refine is one module.

A family module knows its design parameters and their ranges, how to sample a design,
how to refine one (change exactly one parameter), how to render a design as a runnable
Python module, and how to read the design back from a source by parsing it (never by
running it). The rest of the pipeline reaches a family only through `get_family(name)`
and the attributes below; a task (pipeline/catalog.py) names its family.

What a family module provides:

    NAME            the registry key ("transformer", "cnn")
    MODEL_KIND      how the sandbox harness builds its sources (a sandbox.schema MODEL_KINDS
                    entry): "t5" calls build_model(vocab_size), "cnn" calls
                    build_model(input_shape, num_classes)
    PARAMS          the design parameter names, in display order
    RANGES          {param: (lo, hi)}
    Design          a frozen dataclass with .params() -> {param: int} and .to_dict()
    seed_design(config)              the run's starting design (config: a RunConfig)
    sample_design(rng, config)       a design drawn from the family's sample space
    refine(design, rng)              the same design with exactly one parameter moved
    render(design) -> str            the source; one integer literal per design parameter
    parse(source) -> dict | None     the design parameters a source writes, or None
    design_from_params(params, config)  the Design a parsed source of ours describes

Optional, for a family whose sources are declared (model kind "t5", pipeline/declarations.py):

    template_design(source, declaration) -> Design | None   the design `source` is
                    byte for byte the rendering of, or None
    derived_declaration(declaration, design) -> dict        another rendering's
                    declaration with this design's numbers

Optional, for a family where two designs can build the same network:

    network_key(params) -> tuple     equal for parsed designs that build the same network
                    (default: the parameters themselves); a run that samples more than
                    it keeps drops a candidate whose network is its input's or another's

Optional, for how tables and figures show a design (pipeline/report.py, pipeline/plots.py;
`short_names`, `plotted` and `plot_note` below give the defaults):

    SHORT_NAMES     {param: name} shorter names for tables (default: the parameter names)
    PLOTTED         ((param, axis label, log2), ...) what a figure of designs averages per
                    iteration, one panel each in this order; log2 for a width (default:
                    every PARAMS entry, by name, linear)
    PLOT_NOTE       a caveat that figure adds to its title (default: none)
    SPACES          {name: params} the design spaces a run may choose (RunConfig
                    design_space; default: only "paper", every parameter); a family with
                    SPACES takes `refine(design, rng, params=...)`, the chosen space's

Adding a family: one module with these names, and one `register_family(module)` line
(below for the built-in ones).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from pipeline.families import cnn, transformer

REQUIRED = ("NAME", "MODEL_KIND", "PARAMS", "RANGES", "Design", "seed_design", "sample_design",
            "refine", "render", "parse", "design_from_params")

FAMILIES: dict[str, Any] = {}


class UnknownFamily(ValueError):
    pass


def register_family(family: ModuleType | Any) -> Any:
    """Add a family (a module, or any object with the REQUIRED attributes); returns it."""
    missing = [a for a in REQUIRED if not hasattr(family, a)]
    if missing:
        raise TypeError(f"family {getattr(family, 'NAME', family)!r} lacks {', '.join(missing)}")
    FAMILIES[family.NAME] = family
    return family


def unregister_family(name: str) -> None:
    FAMILIES.pop(name, None)


def get_family(name: str) -> Any:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamily(f"unknown family {name!r}; families: {', '.join(FAMILIES)}") from None


# The display defaults; each takes None too (a task whose family this installation does
# not know, e.g. an old run's): its designs then print by their keys and plot nothing.

def short_names(family: Any | None) -> dict[str, str]:
    """{param: the name a table prints it as}; other keys print as they are."""
    return dict(getattr(family, "SHORT_NAMES", {}))


def plotted(family: Any | None) -> tuple[tuple[str, str, bool], ...]:
    """(param, axis label, log2) per panel of a figure of the family's designs."""
    if family is None:
        return ()
    return tuple(getattr(family, "PLOTTED", ((p, p, False) for p in family.PARAMS)))


def plot_note(family: Any | None) -> str:
    return getattr(family, "PLOT_NOTE", "")


register_family(transformer)
register_family(cnn)
