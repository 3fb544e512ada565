"""Property tests of the CNN family: designs, refinements, rendered sources.

The forward-pass tests exec rendered sources in this process. That is allowed here
only because these are the family's own renderings, never generated candidates.
"""
from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.catalog import get_task, task_names
from pipeline.families import cnn, get_family
from pipeline.families.source import int_literals

TASK_SHAPES = [((1, 28, 28), 10), ((1, 28, 28), 62), ((3, 32, 32), 10), ((1, 8, 8), 10), ((1, 40), 10)]
# every registered task of the family, as (input_shape, num_classes)
CATALOG_SHAPES = sorted({(get_task(n).input_shape, get_task(n).num_classes) for n in task_names()
                         if get_task(n).family == "cnn"})
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def designs(max_channels=512, max_hidden=1024):
    """Any valid design, reached the way the dataset reaches them: sample, then refine."""
    @st.composite
    def build(draw):
        rng = random.Random(draw(seeds))
        d = cnn.sample(rng)
        for _ in range(draw(st.integers(0, 6))):
            d = cnn.refine(d, rng)
        # keep the exec'd networks small enough for a CPU test; the wide corners are
        # built once each in test_extreme_designs_build
        return cnn.Design(d.hidden_layers, d.conv_layers, min(d.channels, max_channels),
                          min(d.hidden_size, max_hidden))
    return build()


def build(source, input_shape, num_classes):
    ns: dict = {}
    exec(compile(source, "<rendered>", "exec"), ns)  # our own rendering, see module docstring
    return ns["build_model"](input_shape, num_classes), ns["train"]


def linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def convs(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]


def in_range(d: cnn.Design) -> bool:
    return all(lo <= getattr(d, p) <= hi for p, (lo, hi) in cnn.RANGES.items())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@given(seeds)
def test_sampled_designs_in_range_with_power_of_two_widths(seed):
    d = cnn.sample(random.Random(seed))
    assert in_range(d)
    assert is_pow2(d.channels) and is_pow2(d.hidden_size)


def test_sample_covers_the_ranges():
    rng = random.Random(0)
    seen = {p: set() for p in cnn.PARAMS}
    for _ in range(3000):
        for p, v in cnn.sample(rng).params().items():
            seen[p].add(v)
    assert seen["hidden_layers"] == set(range(1, 9))
    assert seen["conv_layers"] == set(range(0, 9))
    assert seen["channels"] == {16, 32, 64, 128, 256, 512}
    assert seen["hidden_size"] == {16, 32, 64, 128, 256, 512, 1024}


@given(designs(), seeds)
def test_refine_changes_exactly_one_parameter_by_one_step(d, seed):
    r = cnn.refine(d, random.Random(seed))
    assert in_range(r)
    changed = [p for p in cnn.PARAMS if getattr(d, p) != getattr(r, p)]
    assert len(changed) == 1, (d, r)
    p = changed[0]
    old, new = getattr(d, p), getattr(r, p)
    if p in cnn.WIDTHS:
        assert new in (old * 2, old // 2) and is_pow2(new)
    else:
        assert abs(new - old) == 1
    assert (r.lr, r.batch_size) == (d.lr, d.batch_size)


@given(designs(), seeds)
def test_refinement_always_changes_the_source(d, seed):
    # A pair (source, refined) with identical text would teach the LM nothing.
    r = cnn.refine(d, random.Random(seed))
    assert cnn.render(d) != cnn.render(r)


@given(designs(), seeds)
def test_every_refinement_changes_exactly_one_integer_literal(d, seed):
    r = cnn.refine(d, random.Random(seed))
    a, b = int_literals(cnn.render(d)), int_literals(cnn.render(r))
    assert len(a) == len(b)
    assert sum(x != y for x, y in zip(a, b)) == 1, (a, b)
    # and that literal is the whole edit: one line differs
    la, lb = cnn.render(d).splitlines(), cnn.render(r).splitlines()
    assert len(la) == len(lb) and sum(x != y for x, y in zip(la, lb)) == 1


def test_the_seed_is_a_member_of_the_sample_space():
    assert in_range(cnn.SEED) and is_pow2(cnn.SEED.channels) and is_pow2(cnn.SEED.hidden_size)
    # sampling reaches it, and its source has the shape every sampled source has
    rng = random.Random(0)
    assert any(cnn.sample(rng).params() == cnn.SEED.params() for _ in range(60_000))
    seed_src = cnn.render(cnn.SEED)
    for d in (cnn.sample(random.Random(i)) for i in range(20)):
        assert len(int_literals(cnn.render(d))) == len(int_literals(seed_src))
    fam = get_family("cnn")
    assert fam is cnn and fam.MODEL_KIND == "cnn" and fam.seed_design(None) == cnn.SEED
    assert fam.design_from_params(fam.parse(seed_src), None) == cnn.SEED


def test_refine_reaches_every_move_of_its_space():
    d = cnn.Design(hidden_layers=4, conv_layers=4, channels=64, hidden_size=64, kernel_size=5,
                   lr=0.002, batch_size=64)
    for space, params in cnn.SPACES.items():
        rng = random.Random(1)
        seen = {(p, getattr(r, p) > getattr(d, p))
                for r in (cnn.refine(d, rng, params) for _ in range(600))
                for p in cnn.PARAMS if getattr(r, p) != getattr(d, p)}
        assert seen == {(p, up) for p in params for up in (True, False)}, space
    assert cnn.SPACES["paper"] == ("hidden_layers", "conv_layers", "channels", "hidden_size")


def test_extended_moves_stay_on_their_grids():
    rng = random.Random(4)
    d = cnn.SEED
    for _ in range(500):
        d = cnn.refine(d, rng, cnn.PARAMS)     # a random walk: every design it meets is valid
        assert d.kernel_size in cnn.KERNEL_SIZES and d.lr in cnn.LR_GRID
        assert cnn.parse(cnn.render(d)) == d.params()
    assert cnn.step("lr", cnn.LR_GRID[-1], +1) is None and cnn.step("kernel_size", 3, -1) is None
    assert cnn.step("lr", 0.001, +1) == 0.002 and cnn.step("kernel_size", 5, +1) == 7


def test_kernel_size_builds_what_it_says():
    for k in cnn.KERNEL_SIZES:
        d = cnn.Design(hidden_layers=1, conv_layers=3, channels=16, hidden_size=16, kernel_size=k)
        model, _ = build(cnn.render(d), (1, 28, 28), 10)
        assert {c.kernel_size for c in convs(model)} == {(k, k)}
        model(torch.zeros(2, 1, 28, 28))        # every size computed from the input shape


def test_a_source_without_the_extended_constants_reads_as_the_seeds():
    old = cnn.render(cnn.SEED).replace("KERNEL_SIZE = 3\n", "").replace("LEARNING_RATE = 0.001\n", "")
    assert cnn.parse(old)["kernel_size"] == 3 and cnn.parse(old)["lr"] == 0.001
    assert cnn.parse(cnn.render(cnn.SEED).replace("BATCH_SIZE = 32", "BATCH_SIZE = 3.5")) is None


def test_refine_at_the_corners_stays_in_range():
    rng = random.Random(2)
    for d in [cnn.SEED,
              cnn.Design(hidden_layers=1, conv_layers=0, channels=512, hidden_size=1024),
              cnn.Design(hidden_layers=8, conv_layers=8, channels=512, hidden_size=1024),
              cnn.Design(hidden_layers=1, conv_layers=1, channels=16, hidden_size=16)]:
        for _ in range(200):
            assert in_range(cnn.refine(d, rng))


def test_design_rejects_out_of_range_and_non_power_of_two():
    with pytest.raises(ValueError):
        cnn.Design(hidden_layers=9, conv_layers=0, channels=32, hidden_size=16)
    with pytest.raises(ValueError):
        cnn.Design(hidden_layers=1, conv_layers=1, channels=48, hidden_size=16)
    with pytest.raises(ValueError):
        cnn.Design(hidden_layers=1, conv_layers=1, channels=32, hidden_size=2048)


def test_no_channels_move_without_convs():
    # the edit could not change the network; its candidate would repeat the incumbent
    rng = random.Random(3)
    d = cnn.Design(hidden_layers=4, conv_layers=0, channels=64, hidden_size=64)
    assert all(cnn.refine(d, rng).channels == 64 for _ in range(300))


def test_seed_is_the_papers_initial_network():
    src = cnn.render(cnn.SEED)
    assert cnn.parse(src) == {"hidden_layers": 1, "conv_layers": 0, "channels": 32, "hidden_size": 16,
                              "kernel_size": 3, "lr": 0.001, "batch_size": 32}
    assert ("CONV_LAYERS = 0\nCHANNELS = 32\nKERNEL_SIZE = 3\nHIDDEN_LAYERS = 1\nHIDDEN_SIZE = 16\n"
            "LEARNING_RATE = 0.001\nBATCH_SIZE = 32\n") in src
    model, _ = build(src, (1, 28, 28), 10)
    assert [(m.in_features, m.out_features) for m in linears(model)] == [(784, 16), (16, 10)]
    assert not convs(model)


@given(designs())
def test_parse_reads_back_the_design(d):
    assert cnn.parse(cnn.render(d)) == d.params()


def test_parse_rejects_other_shapes():
    assert cnn.parse("def f(:") is None
    assert cnn.parse("import torch\nx = 1\n") is None
    assert cnn.parse("from torch import nn\nm = nn.Linear(4, 2)\n") is None  # no hidden layer
    assert cnn.parse("from torch import nn\nw = 8\nm = nn.Sequential(nn.Linear(4, w), nn.Linear(w, 2))\n") is None
    src = cnn.render(cnn.SEED)
    assert cnn.parse(src.replace("HIDDEN_SIZE = 16", "HIDDEN_SIZE = 2 * 8")) is None   # not a literal
    assert cnn.parse(src.replace("CHANNELS = 32\n", "")) is None                       # one missing
    assert cnn.parse(src.replace("CHANNELS = 32\n", "CHANNELS = True\n")) is None


def test_parse_does_not_run_the_source():
    src = cnn.render(cnn.SEED) + "\nraise SystemExit('ran')\n"
    assert cnn.parse(src)["hidden_size"] == 16


@settings(max_examples=40, deadline=None)
@given(designs(max_channels=32, max_hidden=64), st.sampled_from(TASK_SHAPES))
def test_every_rendered_source_builds_and_runs_a_forward_pass(d, task):
    shape, classes = task
    model, train = build(cnn.render(d), shape, classes)
    assert isinstance(model, torch.nn.Module)
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes)
    optimizer, batch_size = train(model)
    assert isinstance(optimizer, torch.optim.Optimizer) and batch_size == d.batch_size


@pytest.mark.parametrize("shape,classes", sorted(set(TASK_SHAPES) | set(CATALOG_SHAPES)))
def test_deepest_conv_stacks_build_on_every_input(shape, classes):
    # 0..8 convs: the spatial size must never fall below 1 (padding/pool clamps).
    for conv_layers in range(9):
        d = cnn.Design(hidden_layers=2, conv_layers=conv_layers, channels=16, hidden_size=16)
        model, _ = build(cnn.render(d), shape, classes)
        with torch.no_grad():
            assert model(torch.randn(2, *shape)).shape == (2, classes)


@pytest.mark.parametrize("shape,classes", [((3, 32, 32), 10), ((1, 28, 28), 62)])
def test_extreme_designs_build(shape, classes):
    for d in [cnn.Design(hidden_layers=8, conv_layers=8, channels=512, hidden_size=1024),
              cnn.Design(hidden_layers=1, conv_layers=2, channels=512, hidden_size=1024)]:
        model, _ = build(cnn.render(d), shape, classes)
        with torch.no_grad():
            assert model(torch.randn(1, *shape)).shape == (1, classes)


def _linear_in_features(source, shape, classes=10):
    model, _ = build(source, shape, classes)
    return [m.in_features for m in linears(model)]


def test_adding_convs_recomputes_in_features_table2():
    # Paper Table 2: an MLP on 28x28 gains two 3x3 convs and a 2x2 max-pool; the first
    # dense layer's input is re-computed. Here: 28 -> 26 -> 24 -> pool 12, so 128*12*12.
    mlp = cnn.Design(hidden_layers=2, conv_layers=0, channels=128, hidden_size=64)
    assert _linear_in_features(cnn.render(mlp), (1, 28, 28), 62) == [784, 64, 64]
    convnet = cnn.Design(hidden_layers=2, conv_layers=2, channels=128, hidden_size=64)
    src = cnn.render(convnet)
    model, _ = build(src, (1, 28, 28), 62)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs(model)] == \
        [(1, 128, (3, 3), (0, 0)), (128, 128, (3, 3), (0, 0))]
    assert [type(m).__name__ for m in model.features] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d"]
    assert _linear_in_features(src, (1, 28, 28), 62) == [128 * 12 * 12, 64, 64]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 62)


# Spatial size after 0..3 convs, worked out by hand from the rules in cnn's docstring
# (3x3 convs without padding while a side is >= 5, else padding=1; a 2x2 pool after
# every second conv while a side is >= 4).
HAND_SPATIAL = {
    (1, 28, 28): [None, 26 * 26, 12 * 12, 10 * 10],
    (3, 32, 32): [None, 30 * 30, 14 * 14, 12 * 12],
    (1, 8, 8): [None, 6 * 6, 2 * 2, 2 * 2],  # the third conv is padded: 2 is below 5
    (1, 40): [None, 38, 18, 16],
}


@pytest.mark.parametrize("shape", list(HAND_SPATIAL))
def test_each_conv_refinement_recomputes_in_features(shape):
    d = cnn.Design(hidden_layers=1, conv_layers=0, channels=32, hidden_size=16)
    assert _linear_in_features(cnn.render(d), shape)[0] == math.prod(shape)
    for conv_layers in (1, 2, 3):
        d = cnn.Design(d.hidden_layers, conv_layers, d.channels, d.hidden_size)
        src = cnn.render(d)
        assert _linear_in_features(src, shape)[0] == 32 * HAND_SPATIAL[shape][conv_layers]
        model, _ = build(src, shape, 10)
        with torch.no_grad():
            assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_one_dimensional_inputs_use_conv1d():
    d = cnn.Design(hidden_layers=1, conv_layers=2, channels=16, hidden_size=16)
    model, _ = build(cnn.render(d), (1, 40), 10)
    assert [type(m).__name__ for m in model.features] == ["Conv1d", "ReLU", "Conv1d", "ReLU", "MaxPool1d"]
    assert (convs(model)[0].in_channels, convs(model)[0].out_channels) == (1, 16)
    assert _linear_in_features(cnn.render(d), (1, 40))[0] == 16 * 18  # 40 -> 38 -> 36 -> pool 18


def test_flat_inputs_render_no_convs():
    d = cnn.Design(hidden_layers=1, conv_layers=3, channels=16, hidden_size=16)
    src = cnn.render(d)
    assert _linear_in_features(src, (20,), 5)[0] == 20
    model, _ = build(src, (20,), 5)
    assert not convs(model)
    assert model(torch.randn(2, 20)).shape == (2, 5)


def test_wrong_in_features_would_fail():
    # Guard that the forward-pass tests can fail: a source whose first dense layer has
    # the wrong input size does not run.
    d = cnn.Design(hidden_layers=1, conv_layers=2, channels=16, hidden_size=16)
    right = "in_features = in_channels * math.prod(size)"
    assert right in cnn.render(d)
    src = cnn.render(d).replace(right, "in_features = 784")
    model, _ = build(src, (1, 28, 28), 10)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 1, 28, 28))


_policy_missing = importlib.util.find_spec("sandbox.policy") is None


@pytest.mark.skipif(_policy_missing, reason="sandbox/policy.py (the AST gate) is not in the tree yet")
@settings(max_examples=30, deadline=None)
@given(designs(), seeds)
def test_rendered_sources_pass_the_policy_gate(d, seed):
    from sandbox import policy
    for design in (d, cnn.refine(d, random.Random(seed))):
        verdict = policy.check(cnn.render(design))
        assert verdict.ok, verdict


@pytest.mark.skipif(_policy_missing, reason="sandbox/policy.py (the AST gate) is not in the tree yet")
def test_policy_gate_test_can_fail():
    # The gate really looks at our sources: the same source with an open() is refused.
    from sandbox import policy
    src = cnn.render(cnn.SEED) + "\nopen('/etc/passwd')\n"
    assert not policy.check(src).ok
