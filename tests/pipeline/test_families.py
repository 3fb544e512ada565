"""Adding a model family and a task is one family object plus one registration line each.

The toy family here (an MLP with two design parameters) and its task (two Gaussian blobs)
are registered in-test, run through the embedded loop with real process sandboxes and a
real SQLite lineage store, and unregistered afterwards.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace

import pytest
import torch
from click.testing import CliRunner

from pipeline.catalog import TaskSpec, get_task, register_task, unregister_task
from pipeline.cli import main
from pipeline.datasets import TaskData
from pipeline.families import (get_family, plot_note, plotted, register_family, short_names,
                               unregister_family)
from pipeline.families.source import constants_block, int_constants, parse_module
from pipeline.store import TERMINAL_STATUSES, LineageStore
from sandbox.policy import check


@dataclass(frozen=True)
class ToyDesign:
    depth: int
    width: int

    def params(self) -> dict[str, int]:
        return {"depth": self.depth, "width": self.width}

    def to_dict(self) -> dict:
        return asdict(self)


class ToyMLP:
    """A family: what pipeline/families/__init__.py asks of one (a module would do too)."""
    NAME = "toy-mlp"
    MODEL_KIND = "cnn"                       # the sandbox builds build_model(input_shape, classes)
    RANGES = {"depth": (1, 3), "width": (2, 32)}
    PARAMS = tuple(RANGES)
    Design = ToyDesign

    @staticmethod
    def seed_design(config) -> ToyDesign:
        return ToyDesign(depth=1, width=4)

    @staticmethod
    def sample_design(rng: random.Random, config) -> ToyDesign:
        return ToyDesign(*(rng.randint(*ToyMLP.RANGES[p]) for p in ToyMLP.PARAMS))

    @staticmethod
    def refine(design: ToyDesign, rng: random.Random) -> ToyDesign:
        moves = [(p, s) for p in ToyMLP.PARAMS for s in (1, -1)]
        rng.shuffle(moves)
        for p, s in moves:
            lo, hi = ToyMLP.RANGES[p]
            if lo <= getattr(design, p) + s <= hi:
                return replace(design, **{p: getattr(design, p) + s})
        raise AssertionError("unreachable")

    @staticmethod
    def render(design: ToyDesign) -> str:
        return f'''import math

import torch
from torch import nn

{constants_block({"DEPTH": design.depth, "WIDTH": design.width})}

class Net(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        layers = [nn.Flatten()]
        in_features = math.prod(input_shape)
        for _ in range(DEPTH):
            layers.append(nn.Linear(in_features, WIDTH))
            layers.append(nn.Tanh())
            in_features = WIDTH
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def build_model(input_shape, num_classes):
    return Net(input_shape, num_classes)


def train(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05), 16
'''

    @staticmethod
    def parse(source: str) -> dict | None:
        tree = parse_module(source)
        found = int_constants(tree) if tree is not None else {}
        if "DEPTH" not in found or "WIDTH" not in found:
            return None
        return {"depth": found["DEPTH"], "width": found["WIDTH"]}

    @staticmethod
    def design_from_params(params: dict | None, config) -> ToyDesign:
        if params is None:
            raise ValueError("not a toy-mlp source")
        return ToyDesign(params["depth"], params["width"])


def load_blobs(data_dir=None, *, train_samples: int, eval_samples: int, seed: int,
               download: bool = False) -> TaskData:
    """Two Gaussian blobs in 4 dimensions, one per class."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 4, generator=g) * 0.5 + (y.float() * 2 - 1).unsqueeze(1)
        return x, y
    (tx, ty), (ex, ey) = draw(train_samples), draw(eval_samples)
    return TaskData("toy-blobs", 2, tx, ty, ex, ey)


TOY_TASK = TaskSpec("toy-blobs", family="toy-mlp", score="accuracy", input_shape=(4,),
                    num_classes=2, load=load_blobs)


@pytest.fixture
def toy():
    register_family(ToyMLP)          # the one line a new family needs
    register_task(TOY_TASK)          # the one line a new task needs
    yield
    unregister_task(TOY_TASK.name)
    unregister_family(ToyMLP.NAME)


def test_registration_is_visible_and_undone(toy):
    assert get_family("toy-mlp") is ToyMLP and get_task("toy-blobs") is TOY_TASK
    assert TOY_TASK.direction == "max" and not TOY_TASK.self_programming
    src = ToyMLP.render(ToyMLP.seed_design(None))
    assert check(src).ok and ToyMLP.parse(src) == {"depth": 1, "width": 4}


def test_a_family_missing_a_part_is_refused():
    class Half:
        NAME = "half"
        MODEL_KIND = "cnn"
    with pytest.raises(TypeError, match="lacks"):
        register_family(Half)
    with pytest.raises(ValueError, match="unknown family"):
        get_family("half")


def test_unknown_names_say_what_exists():
    with pytest.raises(ValueError, match="unknown task 'nope'.*self.*digits"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown family 'nope'.*transformer.*cnn"):
        get_family("nope")
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        register_task(TaskSpec("orphan", family="nope", score="loss"))
    with pytest.raises(ValueError, match="unknown task 'orphan'"):
        get_task("orphan")
    with pytest.raises(ValueError, match="score must be"):
        TaskSpec("x", family="cnn", score="f1")


@pytest.mark.slow
def test_the_embedded_loop_runs_a_registered_toy_family_and_task(toy, sqlite_url, tmp_path):
    result = CliRunner().invoke(main, [
        "--database-url", sqlite_url, "--artifact-dir", str(tmp_path / "artifacts"),
        "launch", "--task", "toy-blobs", "--iterations", "1", "--candidates", "2",
        "--backend", "process", "--json",
        "--set", "dataset_size=32", "--set", "lm_epochs=1", "--set", "max_new_tokens=120",
        "--set", "train_samples=200", "--set", "eval_samples=100", "--set", "task_epochs=2"])
    assert result.exit_code == 0, (result.output, result.exception)
    run_id = json.loads(result.stdout)["run_id"]

    with LineageStore(sqlite_url) as store:
        run = store.get_run(run_id)
        assert run.status == "completed", run.error
        assert run.task == "toy-blobs" and tuple(run.config["arms"]) == ("lm", "random")
        cands = store.candidates(run_id)
        assert cands and all(c.status in TERMINAL_STATUSES for c in cands)
        seed = ToyMLP.render(ToyMLP.seed_design(None))
        for arm in ("lm", "random"):
            rows = [c for c in cands if c.arm == arm]
            incumbent = next(c for c in rows if c.role == "incumbent")
            assert incumbent.source == seed and incumbent.status == "evaluated"
            assert 0.5 < incumbent.score <= 1.0          # the blobs are easy to separate
            assert incumbent.design == {"depth": 1, "width": 4}
        # the random arm's candidates are the toy family's refinements of the seed
        random_arm = [c for c in cands if c.arm == "random" and c.role == "candidate"]
        assert len(random_arm) == 2 and all(c.status == "evaluated" for c in random_arm)
        for c in random_arm:
            d = ToyMLP.parse(c.source)
            assert sum(d[p] != v for p, v in {"depth": 1, "width": 4}.items()) == 1, d
            assert c.design == d and 0.0 <= c.score <= 1.0
        assert all(math.isfinite(c.score) for c in cands if c.status == "evaluated")


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_a_familys_display_names_only_its_own_parameters(name):
    family = get_family(name)
    assert set(short_names(family)) <= set(family.PARAMS)
    shown = plotted(family)
    assert shown and {p for p, _, _ in shown} <= set(family.PARAMS)
    assert all(isinstance(label, str) and label for _, label, _ in shown)


def test_display_defaults_for_a_family_that_declares_none(toy):
    assert short_names(ToyMLP) == {}
    assert plotted(ToyMLP) == (("depth", "depth", False), ("width", "width", False))
    assert plot_note(ToyMLP) == "" and plotted(None) == () and short_names(None) == {}
