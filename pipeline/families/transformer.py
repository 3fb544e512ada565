"""T5 sources: the family the LM uses to program itself (paper section 4.1).

A design is the four parameters the paper samples and refines. `d_model` is not a
design parameter: it is fixed per run (preset), and `d_kv = d_model // num_heads`.
"""
from __future__ import annotations

import ast
import random
from dataclasses import asdict, dataclass, replace

from sandbox.policy import parse_untrusted

RANGES = {
    "num_layers": (1, 8),
    "num_decoder_layers": (1, 8),
    "d_ff": (64, 4096),
    "num_heads": (1, 16),
}
PARAMS = tuple(RANGES)


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
    d_kv = design.d_model // design.num_heads
    return f'''import torch
import transformers


def build_model(vocab_size):
    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model={design.d_model},
        d_kv={d_kv},
        num_layers={design.num_layers},
        num_decoder_layers={design.num_decoder_layers},
        num_heads={design.num_heads},
        d_ff={design.d_ff},
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


def parse(source: str) -> dict[str, int] | None:
    """Read the design parameters (and d_model, d_kv) from a source without running it.

    Returns None when the source does not have the shape of this family (a generated
    candidate may not); the sandbox still decides whether it runs.
    """
    try:
        tree = parse_untrusted(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):   # a source nested past
        return None                                                   # the parser's limits
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) == "T5Config":
            for kw in node.keywords:
                if kw.arg in (*PARAMS, "d_model", "d_kv") and isinstance(kw.value, ast.Constant) \
                        and isinstance(kw.value.value, int) and not isinstance(kw.value.value, bool):
                    found[kw.arg] = kw.value.value
    return found if all(p in found for p in PARAMS) else None


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""
