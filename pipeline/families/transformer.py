"""T5 sources: the family the LM uses to program itself (paper section 4.1).

A design is the four parameters the paper samples and refines. `d_model` is not a
design parameter: it is fixed per run (preset), and the source derives
`d_kv = D_MODEL // NUM_HEADS`, so a heads refinement edits one number.

A source writes each design parameter once, as a module-level integer constant
(`NUM_LAYERS = 2`, ..., then `D_MODEL`), and the `T5Config` call names the constants.
Every source of the family has the same text around those five numbers, the seed
included, so one refinement changes exactly one integer literal.
"""
from __future__ import annotations

import ast
import random
from dataclasses import asdict, dataclass, replace

from pipeline.families.source import call_name, constants_block, int_constants, is_int, parse_module

NAME = "transformer"
MODEL_KIND = "t5"
RANGES = {
    "num_layers": (1, 8),
    "num_decoder_layers": (1, 8),
    "d_ff": (64, 4096),
    "num_heads": (1, 16),
}
PARAMS = tuple(RANGES)
# design parameter -> the constant a source writes it as
CONSTANTS = {"num_layers": "NUM_LAYERS", "num_decoder_layers": "NUM_DECODER_LAYERS",
             "d_ff": "D_FF", "num_heads": "NUM_HEADS", "d_model": "D_MODEL"}
# how tables name the depths and heads (pipeline/report.py)
SHORT_NAMES = {"num_layers": "enc", "num_decoder_layers": "dec", "num_heads": "heads"}


@dataclass(frozen=True)
class Design:
    num_layers: int
    num_decoder_layers: int
    d_ff: int
    num_heads: int
    d_model: int = 512
    lr: float = 1e-3
    batch_size: int = 16

    def params(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in PARAMS}

    def to_dict(self) -> dict:
        return asdict(self)


def sample(rng: random.Random, d_model: int, lr: float, batch_size: int) -> Design:
    return Design(
        num_layers=rng.randint(*RANGES["num_layers"]),
        num_decoder_layers=rng.randint(*RANGES["num_decoder_layers"]),
        d_ff=rng.randint(*RANGES["d_ff"]),
        num_heads=rng.randint(*RANGES["num_heads"]),
        d_model=d_model, lr=lr, batch_size=batch_size,
    )


def sample_design(rng: random.Random, config) -> Design:
    """A design from the paper's ranges, with the run's d_model, learning rate and batch."""
    return sample(rng, config.d_model, config.lm_lr, config.lm_batch_size)


def seed_design(config) -> Design:
    """The paper's seed LM (2 encoder / 2 decoder layers, 8 heads, d_ff 1024) as the
    run's config sets it."""
    return Design(num_layers=config.seed_layers, num_decoder_layers=config.seed_decoder_layers,
                  d_ff=config.seed_d_ff, num_heads=config.seed_heads, d_model=config.d_model,
                  lr=config.lm_lr, batch_size=config.lm_batch_size)


def design_from_params(params: dict | None, config) -> Design:
    """The design a parsed source describes (for sources we rendered ourselves)."""
    if params is None:
        raise ValueError("the source does not have the shape of the transformer family")
    return Design(**{k: params[k] for k in PARAMS}, d_model=params.get("d_model", config.d_model),
                  lr=config.lm_lr, batch_size=config.lm_batch_size)


def refine(design: Design, rng: random.Random) -> Design:
    """Change exactly one design parameter, the way the paper's refinements do.

    Depths and heads move by one step, d_ff by a random 1%..50% up or down. A move
    that would leave the range, or that rounds to no change, is not taken; another
    (parameter, direction) is drawn instead, so the result always differs in one place.
    """
    moves = [(p, s) for p in PARAMS for s in (+1, -1)]
    rng.shuffle(moves)
    for param, sign in moves:
        lo, hi = RANGES[param]
        old = getattr(design, param)
        if param == "d_ff":
            pct = rng.randint(1, 50)
            new = round(old * (1 + sign * pct / 100))
        else:
            new = old + sign
        if new != old and lo <= new <= hi:
            return replace(design, **{param: new})
    raise AssertionError("unreachable: some move is always in range")  # ranges have width > 1


def render(design: Design) -> str:
    """The design as a complete module: `build_model(vocab_size)` and `train(model)`."""
    constants = constants_block({CONSTANTS[k]: getattr(design, k) for k in (*PARAMS, "d_model")})
    return f'''import torch
import transformers

{constants}

def build_model(vocab_size):
    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=D_MODEL,
        d_kv=D_MODEL // NUM_HEADS,
        num_layers=NUM_LAYERS,
        num_decoder_layers=NUM_DECODER_LAYERS,
        num_heads=NUM_HEADS,
        d_ff=D_FF,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config)


def train(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr={design.lr!r})
    batch_size = {design.batch_size}
    return optimizer, batch_size
'''


def template_design(source: str, declaration: dict) -> Design | None:
    """The design `source` is the rendering of, when it is byte for byte `render` of a
    design with the learning rate and batch size `declaration` declares; else None.
    Such a source is this module's own code with five numbers filled in."""
    params = parse(source)
    if params is None or "d_model" not in params:
        return None
    try:
        design = Design(**{k: params[k] for k in PARAMS}, d_model=params["d_model"],
                        lr=declaration["hyper"]["lr"], batch_size=declaration["batch_size"])
    except (KeyError, TypeError):
        return None
    return design if render(design) == source else None


def derived_declaration(declaration: dict, design: Design) -> dict:
    """The declaration (sandbox/schema.py Declaration, as data) of `render(design)`, from
    the declaration of another rendering: renderings differ only in the five numbers,
    and those set exactly these keys of T5Config and the optimizer."""
    model = dict(declaration["model"], d_model=design.d_model,
                 d_kv=design.d_model // design.num_heads, num_layers=design.num_layers,
                 num_decoder_layers=design.num_decoder_layers, num_heads=design.num_heads,
                 d_ff=design.d_ff)
    return {**declaration, "model": model, "hyper": dict(declaration["hyper"], lr=design.lr),
            "batch_size": design.batch_size}


def parse(source: str) -> dict[str, int] | None:
    """Read the design parameters (and d_model, d_kv) from a source without running it.

    The values are what the `T5Config` call receives: an integer literal, a module-level
    integer constant, or the floor division of two such (`D_MODEL // NUM_HEADS`).
    Returns None when the source does not have the shape of this family (a generated
    candidate may not); the sandbox still decides whether it runs.
    """
    tree = parse_module(source)
    if tree is None:
        return None
    constants = int_constants(tree)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and call_name(node.func) == "T5Config":
            for kw in node.keywords:
                if kw.arg in (*PARAMS, "d_model", "d_kv"):
                    value = _value(kw.value, constants)
                    if value is not None:
                        found[kw.arg] = value
    return found if all(p in found for p in PARAMS) else None


def _value(node: ast.expr, constants: dict[str, int]) -> int | None:
    if is_int(node):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv):
        a, b = _value(node.left, constants), _value(node.right, constants)
        if a is not None and b:
            return a // b
    return None
