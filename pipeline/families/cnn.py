"""CNN sources: the family the LM programs for vision tasks (paper sections 3.2, 4.2).

A design is the paper's four parameters: conv layers 0..8, channels 16..512 (the width
of every conv layer), hidden (dense) layers 1..8 and hidden size 16..1024 (the width of
every hidden dense layer). Depths move by one; widths are powers of two and move by a
factor of two, because the paper reads widths on a log2 scale (its Figure 5): a +-1
step on a width of 16..1024 would take hundreds of refinements to cross the range.

A source writes the design as four module-level integer constants, one literal each:

    CONV_LAYERS = 0
    CHANNELS = 32
    HIDDEN_LAYERS = 1
    HIDDEN_SIZE = 16

and the same code for every design: `Net(input_shape, num_classes)` builds its layers
in loops over those constants and computes every size (the first dense layer's
`in_features` included) from the input shape it is given, so the source is the same
for every task and one refinement changes exactly one integer literal. The seed (one
hidden layer of 16 units, no convs) is a member of the sample space like any design.

What the code builds (the rules of `render`'s `Net`):
- Convs are 3-wide kernels (Conv2d on [C, H, W] inputs, Conv1d on [C, L] inputs), each
  followed by a ReLU. A conv has no padding (it shrinks the size by 2) while the
  smallest spatial side is at least 5; below that it uses `padding=1` and keeps the
  size, so a deep stack never shrinks a side below 3 (or below the input's own size).
- After every second conv comes a 2-wide max-pool, while the smallest side is at least
  4 (so a pool never leaves a side below 2).
- Then Flatten, `HIDDEN_LAYERS` blocks of Linear(HIDDEN_SIZE) + ReLU, and the output
  Linear(num_classes).
- Flat inputs ([D], no channel axis) take no convs: CONV_LAYERS is read but builds
  nothing.

CHANNELS is written even when there are no convs (the seed writes 32); `refine` does
not move it while CONV_LAYERS is 0, because that edit could not change the network
and its candidate would only repeat the incumbent's score.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

from pipeline.families.source import constants_block, int_constants, parse_module

NAME = "cnn"
MODEL_KIND = "cnn"
RANGES = {
    "hidden_layers": (1, 8),
    "conv_layers": (0, 8),
    "channels": (16, 512),
    "hidden_size": (16, 1024),
}
PARAMS = tuple(RANGES)
WIDTHS = ("channels", "hidden_size")  # powers of two, moved by x2 / /2
# design parameter -> the constant a source writes it as, in the order the source does
CONSTANTS = {"conv_layers": "CONV_LAYERS", "channels": "CHANNELS",
             "hidden_layers": "HIDDEN_LAYERS", "hidden_size": "HIDDEN_SIZE"}


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

    def params(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in PARAMS}

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's initial network: one hidden layer of 16 units, no convs.
SEED = Design(hidden_layers=1, conv_layers=0, channels=32, hidden_size=16)

# How a figure of designs shows them (pipeline/plots.py, the paper's Figure 5): the
# widths averaged as log2, as the paper reads them; a net without convs still writes
# the seed's CHANNELS, which that average counts.
PLOTTED = (("hidden_layers", "hidden layers", False), ("conv_layers", "conv layers", False),
           ("hidden_size", "log2 hidden size", True), ("channels", "log2 conv channels", True))
PLOT_NOTE = f"channels read {SEED.channels} for a net without convs"


def _pow2_choices(param: str) -> list[int]:
    lo, hi = RANGES[param]
    return [2 ** k for k in range(lo.bit_length() - 1, hi.bit_length()) if lo <= 2 ** k <= hi]


def sample(rng: random.Random, lr: float = 1e-3, batch_size: int = 32) -> Design:
    conv_layers = rng.randint(*RANGES["conv_layers"])
    return Design(
        hidden_layers=rng.randint(*RANGES["hidden_layers"]),
        conv_layers=conv_layers,
        channels=rng.choice(_pow2_choices("channels")),
        hidden_size=rng.choice(_pow2_choices("hidden_size")),
        lr=lr, batch_size=batch_size,
    )


def sample_design(rng: random.Random, config=None) -> Design:
    """A design from the paper's ranges (the network's lr and batch are the seed's)."""
    return sample(rng, SEED.lr, SEED.batch_size)


def seed_design(config=None) -> Design:
    return SEED


def design_from_params(params: dict | None, config=None) -> Design:
    """The design a parsed source describes (for sources we rendered ourselves)."""
    if params is None:
        raise ValueError("the source does not have the shape of the cnn family")
    return Design(**{k: params[k] for k in PARAMS}, lr=SEED.lr, batch_size=SEED.batch_size)


def refine(design: Design, rng: random.Random) -> Design:
    """Change exactly one design parameter by one step: a depth by +-1, a width x2 or /2.

    Moves that leave the range are not taken, nor a channels move while there are no
    convs (see the module docstring); another (parameter, direction) is drawn instead.
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
        return replace(design, **{param: new})
    raise AssertionError("unreachable: hidden_layers can always move one way")


def network_key(params: dict) -> tuple:
    """Without convs the channel count builds nothing: such designs are one network."""
    return tuple((p, params[p]) for p in PARAMS
                 if not (p == "channels" and params.get("conv_layers") == 0))


def render(design: Design) -> str:
    """The design as a complete module: `Net`, `build_model(input_shape, num_classes)`
    and `train(model)`. The same text for every task; the sizes come from the input
    shape when the sandbox builds the model."""
    constants = constants_block({name: getattr(design, p) for p, name in CONSTANTS.items()})
    return f'''import math

import torch
from torch import nn

{constants}

class Net(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        in_channels = input_shape[0]
        size = list(input_shape[1:])
        conv = nn.Conv2d if len(size) == 2 else nn.Conv1d
        pool = nn.MaxPool2d if len(size) == 2 else nn.MaxPool1d
        features = []
        for i in range(CONV_LAYERS if size else 0):
            padding = 0 if min(size) >= 5 else 1
            features.append(conv(in_channels, CHANNELS, 3, padding=padding))
            features.append(nn.ReLU())
            size = [s + 2 * padding - 2 for s in size]
            in_channels = CHANNELS
            if i % 2 == 1 and min(size) >= 4:
                features.append(pool(2))
                size = [s // 2 for s in size]
        in_features = in_channels * math.prod(size)
        classifier = [nn.Flatten()]
        for _ in range(HIDDEN_LAYERS):
            classifier.append(nn.Linear(in_features, HIDDEN_SIZE))
            classifier.append(nn.ReLU())
            in_features = HIDDEN_SIZE
        classifier.append(nn.Linear(in_features, num_classes))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(input_shape, num_classes):
    return Net(input_shape, num_classes)


def train(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr={design.lr!r})
    batch_size = {design.batch_size}
    return optimizer, batch_size
'''


def parse(source: str) -> dict[str, int] | None:
    """Read the four design parameters from a source without running it: the values of
    its module-level constants CONV_LAYERS, CHANNELS, HIDDEN_LAYERS and HIDDEN_SIZE,
    as written (not checked against RANGES). Returns None when the source does not
    parse or lacks one of them as an integer literal."""
    tree = parse_module(source)
    if tree is None:
        return None
    constants = int_constants(tree)
    if any(name not in constants for name in CONSTANTS.values()):
        return None
    return {p: constants[CONSTANTS[p]] for p in PARAMS}
