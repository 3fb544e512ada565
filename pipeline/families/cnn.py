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

The extended design space (`design_space=extended`, for searches where the proposer
matters: more moves than candidates per iteration) adds three parameters that the
source also writes as constants, KERNEL_SIZE, LEARNING_RATE and BATCH_SIZE:
- kernel_size 3, 5 or 7 (moves by 2): every conv's kernel; a conv keeps no padding
  while the smallest side is at least kernel_size + 2, then pads by kernel_size // 2
  and keeps the size (for 3 exactly the rule above); conv-only like channels;
- lr on a grid of powers of two times 0.000125, 0.000125..0.016 (moves x2 or /2): the
  AdamW learning rate of `train(model)`;
- batch_size 8..256, powers of two (moves x2 or /2).
In the paper's space these stay at the seed's values (3, 0.001, 32), so a paper-space
source builds and trains what it did before they were written out.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

from pipeline.families.source import constants_block, number_constants, parse_module

NAME = "cnn"
MODEL_KIND = "cnn"
LR_GRID = (0.000125, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016)
KERNEL_SIZES = (3, 5, 7)
RANGES = {
    "hidden_layers": (1, 8),
    "conv_layers": (0, 8),
    "channels": (16, 512),
    "hidden_size": (16, 1024),
    "kernel_size": (3, 7),
    "lr": (LR_GRID[0], LR_GRID[-1]),
    "batch_size": (8, 256),
}
PARAMS = tuple(RANGES)
PAPER_PARAMS = PARAMS[:4]
# design space name (RunConfig.design_space) -> the parameters a refinement may move
SPACES = {"paper": PAPER_PARAMS, "extended": PARAMS}
WIDTHS = ("channels", "hidden_size", "batch_size")  # powers of two, moved by x2 / /2
CONV_ONLY = ("channels", "kernel_size")             # build nothing without convs
# design parameter -> the constant a source writes it as, in the order the source does
CONSTANTS = {"conv_layers": "CONV_LAYERS", "channels": "CHANNELS",
             "kernel_size": "KERNEL_SIZE", "hidden_layers": "HIDDEN_LAYERS",
             "hidden_size": "HIDDEN_SIZE", "lr": "LEARNING_RATE", "batch_size": "BATCH_SIZE"}
# what a source written before the extended space lacks reads as the seed's values
OPTIONAL = {"kernel_size": 3, "lr": 0.001, "batch_size": 32}


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class Design:
    hidden_layers: int
    conv_layers: int
    channels: int
    hidden_size: int
    kernel_size: int = 3
    lr: float = 0.001
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
        if self.kernel_size not in KERNEL_SIZES or self.lr not in LR_GRID:
            raise ValueError(f"kernel_size {self.kernel_size} or lr {self.lr} off its grid")

    def params(self) -> dict[str, int | float]:
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


def sample(rng: random.Random, extended: bool = False) -> Design:
    conv_layers = rng.randint(*RANGES["conv_layers"])
    design = Design(
        hidden_layers=rng.randint(*RANGES["hidden_layers"]),
        conv_layers=conv_layers,
        channels=rng.choice(_pow2_choices("channels")),
        hidden_size=rng.choice(_pow2_choices("hidden_size")),
    )
    if not extended:   # (the paper's space draws exactly what it drew before)
        return design
    return replace(design, kernel_size=rng.choice(KERNEL_SIZES), lr=rng.choice(LR_GRID),
                   batch_size=rng.choice(_pow2_choices("batch_size")))


def sample_design(rng: random.Random, config=None) -> Design:
    """A design from the run's space (the paper's: its lr, batch and kernel are the seed's)."""
    return sample(rng, extended=getattr(config, "design_space", "paper") == "extended")


def seed_design(config=None) -> Design:
    return SEED


def design_from_params(params: dict | None, config=None) -> Design:
    """The design a parsed source describes (for sources we rendered ourselves)."""
    if params is None:
        raise ValueError("the source does not have the shape of the cnn family")
    return Design(**{k: params.get(k, OPTIONAL.get(k)) for k in PARAMS})


def step(param: str, value, sign: int):
    """One move of one parameter: a depth by +-1, a width x2 or /2, the kernel by 2, the
    learning rate one grid step; None where that leaves the range."""
    if param == "lr":
        i = LR_GRID.index(value) + sign
        return LR_GRID[i] if 0 <= i < len(LR_GRID) else None
    if param in WIDTHS:
        new = value * 2 if sign > 0 else value // 2
    else:
        new = value + (2 * sign if param == "kernel_size" else sign)
    lo, hi = RANGES[param]
    return new if lo <= new <= hi else None


def refine(design: Design, rng: random.Random, params: tuple[str, ...] = PAPER_PARAMS) -> Design:
    """Change exactly one of `params` (the run's design space) by one step.

    Moves that leave the range are not taken, nor a conv-only move while there are no
    convs (see the module docstring); another (parameter, direction) is drawn instead.
    """
    moves = [(p, s) for p in params for s in (+1, -1)]
    rng.shuffle(moves)
    for param, sign in moves:
        if param in CONV_ONLY and design.conv_layers == 0:
            continue
        new = step(param, getattr(design, param), sign)
        if new is not None:
            return replace(design, **{param: new})
    raise AssertionError("unreachable: hidden_layers can always move one way")


def network_key(params: dict) -> tuple:
    """Without convs the conv-only parameters build nothing: such designs are one network."""
    return tuple((p, params.get(p, OPTIONAL.get(p))) for p in PARAMS
                 if not (p in CONV_ONLY and params.get("conv_layers") == 0))


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
            padding = 0 if min(size) >= KERNEL_SIZE + 2 else KERNEL_SIZE // 2
            features.append(conv(in_channels, CHANNELS, KERNEL_SIZE, padding=padding))
            features.append(nn.ReLU())
            size = [s + 2 * padding - (KERNEL_SIZE - 1) for s in size]
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    return optimizer, BATCH_SIZE
'''


def parse(source: str) -> dict[str, int | float] | None:
    """Read the design parameters from a source without running it: the values of its
    module-level constants (CONSTANTS), as written (not checked against RANGES); the
    OPTIONAL ones read as the seed's when a source does not write them. Returns None
    when the source does not parse or lacks a required one as a literal (an integer;
    LEARNING_RATE may be a float)."""
    tree = parse_module(source)
    if tree is None:
        return None
    constants = number_constants(tree)
    out = {}
    for p in PARAMS:
        value = constants.get(CONSTANTS[p], OPTIONAL.get(p))
        if value is None or (p != "lr" and not isinstance(value, int)):
            return None
        out[p] = value
    return out
