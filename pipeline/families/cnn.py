"""CNN sources: the family the LM programs for vision tasks (paper sections 3.2, 4.2).

A design is the paper's four parameters: hidden (dense) layers 1..8, conv layers 0..8,
channels 16..512 (the width of every conv layer) and hidden size 16..1024 (the width of
every hidden dense layer). Depths move by one; widths are powers of two and move by a
factor of two, because the paper reads widths on a log2 scale (its Figure 5).

Rendering rules (what `render` writes, and what `conv_plan` computes):
- A source is a `Net(nn.Module)` with two `nn.Sequential`s, `features` (the convs) and
  `classifier` (Flatten, then `hidden_layers` Linear+ReLU blocks, then the output
  Linear). Every size is written out as a literal, like the paper's Table 2, so a
  refinement changes few tokens: one layer's lines and the first dense `in_features`.
- Convs are 3-wide kernels (Conv2d on [C, H, W] inputs, Conv1d on [C, L] inputs), each
  followed by a ReLU. A conv has no padding (it shrinks the size by 2) while the
  smallest spatial side is at least 5; below that it uses `padding=1` and keeps the
  size, so a deep stack never shrinks a side below 3 (or below the input's own size).
- After every second conv comes a 2-wide max-pool, while the smallest side is at least
  4 (so a pool never leaves a side below 2).
- The first dense layer's `in_features` is channels x the spatial size after that plan,
  or the flattened input size when there are no convs.
- Flat inputs ([D], no channel axis) cannot take convs: their sources render the conv
  layers as nothing, so for them `parse(render(d))` reports 0 conv layers.
- A network without convs has no conv width to show, so a design with 0 conv layers
  always has `channels == NO_CONV_CHANNELS` (the width the first conv gets when one is
  added). That keeps the source the whole design: `parse(render(d)) == d.params()`.
  It is why `refine` does not change channels while there are no convs, and removes the
  last conv only when the conv width is back at NO_CONV_CHANNELS: either move would
  otherwise be invisible in the source, or change two parameters at once.
"""
from __future__ import annotations

import ast
import math
import random
from dataclasses import asdict, dataclass, replace

from sandbox.policy import parse_untrusted

RANGES = {
    "hidden_layers": (1, 8),
    "conv_layers": (0, 8),
    "channels": (16, 512),
    "hidden_size": (16, 1024),
}
PARAMS = tuple(RANGES)
WIDTHS = ("channels", "hidden_size")  # powers of two, moved by x2 / /2
NO_CONV_CHANNELS = 32


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Design:
    hidden_layers: int
    conv_layers: int
    channels: int
    hidden_size: int
    lr: float = 1e-3
    batch_size: int = 32

    def __post_init__(self):
        # Catch a bad design where it is made, not later as a confusing shape error.
        for p in PARAMS:
            lo, hi = RANGES[p]
            v = getattr(self, p)
            if not lo <= v <= hi:
                raise ValueError(f"{p}={v} outside {lo}..{hi}")
        for p in WIDTHS:
            if not _is_pow2(getattr(self, p)):
                raise ValueError(f"{p}={getattr(self, p)} is not a power of two")
        if self.conv_layers == 0 and self.channels != NO_CONV_CHANNELS:
            raise ValueError(f"a design without convs has channels={NO_CONV_CHANNELS}")

    def params(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in PARAMS}

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's initial network: one hidden layer of 16 units, no convs.
SEED = Design(hidden_layers=1, conv_layers=0, channels=NO_CONV_CHANNELS, hidden_size=16)


def _pow2_choices(param: str) -> list[int]:
    lo, hi = RANGES[param]
    return [2 ** k for k in range(lo.bit_length() - 1, hi.bit_length()) if lo <= 2 ** k <= hi]


def sample(rng: random.Random, lr: float = 1e-3, batch_size: int = 32) -> Design:
    conv_layers = rng.randint(*RANGES["conv_layers"])
    channels = rng.choice(_pow2_choices("channels"))  # drawn always, so the rng stream does not depend on it
    return Design(
        hidden_layers=rng.randint(*RANGES["hidden_layers"]),
        conv_layers=conv_layers,
        channels=channels if conv_layers else NO_CONV_CHANNELS,
        hidden_size=rng.choice(_pow2_choices("hidden_size")),
        lr=lr, batch_size=batch_size,
    )


def refine(design: Design, rng: random.Random) -> Design:
    """Change exactly one design parameter by one step: a depth by +-1, a width x2 or /2.

    Moves that leave the range, or that the source could not show (see the module
    docstring), are not taken; another (parameter, direction) is drawn instead.
    """
    moves = [(p, s) for p in PARAMS for s in (+1, -1)]
    rng.shuffle(moves)
    for param, sign in moves:
        lo, hi = RANGES[param]
        old = getattr(design, param)
        if param in WIDTHS:
            new = old * 2 if sign > 0 else old // 2
        else:
            new = old + sign
        if not lo <= new <= hi:
            continue
        if param == "channels" and design.conv_layers == 0:
            continue
        if param == "conv_layers" and new == 0 and design.channels != NO_CONV_CHANNELS:
            continue
        return replace(design, **{param: new})
    raise AssertionError("unreachable: hidden_layers can always move one way")


def conv_plan(design: Design, input_shape: tuple[int, ...]) -> tuple[list[tuple[int, bool]], int]:
    """The conv stack for an input shape: [(padding, pool_after)] per conv, and the
    number of features the first dense layer receives. Rules in the module docstring."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) not in (1, 2, 3):
        raise ValueError(f"input_shape must be [D], [C, L] or [C, H, W], got {input_shape}")
    if len(input_shape) == 1 or design.conv_layers == 0:
        return [], math.prod(input_shape)
    spatial = list(input_shape[1:])
    plan = []
    for i in range(1, design.conv_layers + 1):
        if min(spatial) >= 5:
            padding = 0
            spatial = [s - 2 for s in spatial]
        else:
            padding = 1
        pool = i % 2 == 0 and min(spatial) >= 4
        if pool:
            spatial = [s // 2 for s in spatial]
        plan.append((padding, pool))
    return plan, design.channels * math.prod(spatial)


def render(design: Design, input_shape: tuple[int, ...], num_classes: int) -> str:
    """The design as a complete module: `Net`, `build_model(input_shape, num_classes)`
    and `train(model)`, with every layer size written out for this input shape."""
    plan, in_features = conv_plan(design, input_shape)
    dim = "1d" if len(input_shape) == 2 else "2d"
    in_channels = input_shape[0]

    features = []
    for padding, pool in plan:
        pad = ", padding=1" if padding else ""
        features.append(f"nn.Conv{dim}({in_channels}, {design.channels}, 3{pad}),")
        features.append("nn.ReLU(),")
        if pool:
            features.append(f"nn.MaxPool{dim}(2),")
        in_channels = design.channels

    classifier = ["nn.Flatten(),"]
    width = in_features
    for _ in range(design.hidden_layers):
        classifier.append(f"nn.Linear({width}, {design.hidden_size}),")
        classifier.append("nn.ReLU(),")
        width = design.hidden_size
    classifier.append(f"nn.Linear({width}, {num_classes}),")

    indent = "\n" + " " * 12
    features_src = (indent + indent.join(features) + "\n        ") if features else ""
    return f'''import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential({features_src})
        self.classifier = nn.Sequential({indent}{indent.join(classifier)}
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(input_shape, num_classes):
    return Net()


def train(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr={design.lr!r})
    batch_size = {design.batch_size}
    return optimizer, batch_size
'''


def parse(source: str) -> dict[str, int] | None:
    """Read the four design parameters from a source without running it.

    conv_layers counts Conv1d/Conv2d calls, hidden_layers is the number of Linear calls
    less the output layer; channels and hidden_size are the out-widths of the first conv
    and the first Linear (the family's sources use one width per kind; a generated
    candidate may not, and then the first layer speaks for it). Values are read as
    written, not checked against RANGES. Returns None when the source does not have
    this family's shape (no parse, fewer than two Linear layers, a non-literal width).
    """
    try:
        tree = parse_untrusted(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):   # a source nested past
        return None                                                   # the parser's limits
    convs, linears = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in ("Conv1d", "Conv2d"):
                convs.append(node)
            elif name == "Linear":
                linears.append(node)
    if len(linears) < 2:
        return None
    # ast.walk is breadth-first: put the layers back in source order.
    convs.sort(key=lambda n: (n.lineno, n.col_offset))
    linears.sort(key=lambda n: (n.lineno, n.col_offset))
    channels = _out_width(convs[0], "out_channels") if convs else NO_CONV_CHANNELS
    hidden_size = _out_width(linears[0], "out_features")
    if channels is None or hidden_size is None:
        return None
    return {
        "hidden_layers": len(linears) - 1,
        "conv_layers": len(convs),
        "channels": channels,
        "hidden_size": hidden_size,
    }


def _out_width(call: ast.Call, keyword: str) -> int | None:
    """The second argument of Conv/Linear (positional or by keyword), if an int literal."""
    value = call.args[1] if len(call.args) >= 2 else None
    for kw in call.keywords:
        if kw.arg == keyword:
            value = kw.value
    if isinstance(value, ast.Constant) and isinstance(value.value, int) and not isinstance(value.value, bool):
        return value.value
    return None


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""
