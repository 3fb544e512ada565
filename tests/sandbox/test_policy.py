"""The static gate: what the two families render passes, hostile sources fail by rule."""
from __future__ import annotations

import random

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.families import cnn, transformer
from sandbox.policy import DEFAULT_POLICY, STRING_EVALUATING_CALLS, Policy, check

# ----------------------------------------------------------------- what must pass


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), d_model=st.sampled_from([16, 64, 128, 512]),
       lr=st.floats(1e-6, 1e-1), batch_size=st.integers(1, 256))
def test_rendered_transformer_sources_pass(seed, d_model, lr, batch_size):
    rng = random.Random(seed)
    design = transformer.sample(rng, d_model, lr, batch_size)
    for d in (design, transformer.refine(design, rng)):
        verdict = check(transformer.render(d))
        assert verdict.ok, verdict


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_rendered_cnn_sources_pass(seed):
    # one source text per design, whatever the task's input shape
    rng = random.Random(seed)
    design = cnn.sample(rng)
    for d in (design, cnn.refine(design, rng)):
        verdict = check(cnn.render(d))
        assert verdict.ok, verdict


HANDWRITTEN_CNN = '''import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, input_shape, num_classes):
        super(Net, self).__init__()
        self.convs = nn.ModuleList([nn.Conv2d(input_shape[0], 16, 3, padding=1)])
        self.fc = nn.Linear(16 * input_shape[1] * input_shape[2], num_classes)
        self._width = 16
        self.fc.weight.data.mul_(0.5)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.fc(torch.flatten(x, 1))


def build_model(input_shape, num_classes):
    model = Net(input_shape, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model


def train(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), 32
'''


def test_handwritten_nn_module_subclass_passes():
    # super(Net, self).__init__(), self._private, attribute stores on self and on
    # parameters of a model: all ordinary model code.
    assert check(HANDWRITTEN_CNN).ok, check(HANDWRITTEN_CNN)


def test_bytes_and_str_agree():
    src = transformer.render(transformer.sample(random.Random(1), 64, 1e-3, 8))
    assert check(src).ok and check(src.encode()).ok


# ----------------------------------------------------------------- what must fail

HOSTILE = [
    # imports
    ("import os", "import"),
    ("import subprocess", "import"),
    ("import ctypes", "import"),
    ("import socket", "import"),
    ("import sys", "import"),
    ("import importlib", "import"),
    ("import builtins", "import"),
    ("from os import system", "import"),
    ("import torch.hub", "import"),
    ("import torch._C", "import"),
    ("from torch import load", "import"),
    ("from torch import *", "import"),
    ("from . import harness", "import"),
    ("from .. import schema", "import"),
    ("def f():\n    import os\n", "import"),
    # dunders
    ("__import__('os')", "dunder"),
    ("x = ().__class__.__bases__", "dunder"),
    ("x = [].__class__.__base__.__subclasses__()", "dunder"),
    ("x = __builtins__", "dunder"),
    ("def f(): pass\nx = f.__globals__", "dunder"),
    ("class A:\n    def __getattr__(self, name):\n        return 1\n", "dunder"),
    ("class A:\n    def __torch_function__(self, *a):\n        return 1\n", "dunder"),
    ("class A:\n    def __init__(self):\n        object.__init__(self)\n", "dunder"),
    ("from torch import __version__", "dunder"),
    ("if __name__ == '__main__':\n    pass\n", "dunder"),
    # builtins that run code or open files, referenced in any way
    ("exec('import os')", "builtin-call"),
    ("eval('1+1')", "builtin-call"),
    ("compile('1', 'x', 'eval')", "builtin-call"),
    ("open('/etc/passwd').read()", "builtin-call"),
    ("f = open\nf('/etc/passwd')", "builtin-call"),
    ("x = globals()", "builtin-call"),
    ("x = vars()", "builtin-call"),
    ("breakpoint()", "builtin-call"),
    ("x = memoryview(b'')", "builtin-call"),
    # attribute access by string
    ("import torch\ngetattr(torch, 'load')('w.pt')", "getattr"),
    ("import torch\nsetattr(torch, 'x', 1)", "getattr"),
    ("import torch\nhasattr(torch, 'load')", "getattr"),
    # dangerous attributes reachable from allowed modules
    ("import torch\ntorch.load('weights.pt')", "attribute"),
    ("import torch\ntorch.save({}, '/tmp/x')", "attribute"),
    ("import torch\ntorch.hub.list('x')", "attribute"),
    ("import typing\ntyping.sys.modules", "attribute"),
    ("import torch\ntorch.os.system('id')", "attribute"),
    ("import transformers\nm = transformers.T5Model.from_pretrained('t5-small')", "attribute"),
    ("def g():\n    yield 1\nx = g().gi_frame.f_globals", "attribute"),
    ("x = '{0.__class__}'.format(1)", "attribute"),
    ("import collections\ncollections._sys", "private"),
    ("import torch\nx = torch._C", "private"),
    # library calls that evaluate or compile a string, wherever an allowed module has one
    ("import typing\ndef f(x: 'print(1)'): pass\ntyping.get_type_hints(f)", "attribute"),
    ("import typing\nr = typing.ForwardRef('1+1')", "attribute"),
    ("from typing import get_type_hints", "import"),
    ("import torch\nt = torch.utils.benchmark.Timer(stmt='x = 1')", "attribute"),
    ("import torch\ng = torch.fx.symbolic_trace(torch.nn.Linear(1, 1))", "attribute"),
    ("import torch.fx", "import"),
    ("from torch.utils import benchmark", "import"),
    ("import torch\nm = torch.jit.script(torch.nn.Linear(1, 1))", "attribute"),
    ("import torch\ne = torch.export.export(torch.nn.Linear(1, 1), (torch.ones(1),))", "attribute"),
    ("import torch\nf = torch.compile(lambda x: x)", "attribute"),
    # file-writing methods of array types (numpy through Tensor.numpy(), torch)
    ("import torch\ntorch.zeros(4).numpy().tofile('/dev/shm/x')", "attribute"),
    ("import torch\ntorch.zeros(4).numpy().dump('/tmp/x')", "attribute"),
    ("import torch\na = torch.zeros(4).numpy()\nb = a.dumps()", "attribute"),
    ("import torch\nx = torch.zeros(4)\ntorch.save(x, '/tmp/x')", "attribute"),
    ("import transformers\ntransformers.T5Config().to_json_file('/tmp/c.json')", "attribute"),
    ("import torch\nw = torch.utils.tensorboard.SummaryWriter('/tmp/tb')", "attribute"),
    ("import torch\np = torch.profiler.profile()", "attribute"),
    # monkeypatching modules (the harness computes the loss in the same process)
    ("import torch\ntorch.nn.functional.cross_entropy = lambda *a, **k: 0", "attribute-store"),
    ("import torch\ntorch.x = 1", "attribute-store"),
    ("torch.nn.functional.cross_entropy = None", "attribute-store"),  # even unimported
    ("import torch.nn.functional as F\nF.cross_entropy = None", "attribute-store"),
    ("from torch.nn import functional\nfunctional.cross_entropy = None", "attribute-store"),
    ("import torch\nF = torch.nn.functional\nF.cross_entropy = None", "attribute-store"),
    ("import torch\nfor m in [torch.nn.functional]:\n    m.cross_entropy = None", "attribute-store"),
    ("import torch\ndef patch(m):\n    m.cross_entropy = None\npatch(torch.nn.functional)",
     "attribute-store"),
    ("import torch\nget = lambda: torch\nget().x = 1", "attribute-store"),
    ("import torch\nclass A:\n    def __init__(self):\n        self.f = torch.nn.functional\n"
     "    def go(self):\n        self.f.cross_entropy = None\n", "attribute-store"),
    ("import torch\ntorch.Tensor.backward = None", "attribute-store"),
    ("import torch\ndel torch.nn.functional.cross_entropy", "attribute-store"),
    ("import math\nmath.pi += 1", "attribute-store"),
    # scope statements
    ("def f():\n    global x\n    x = 1\n", "scope"),
    # malformed text
    ("def f(:\n", "syntax"),
    ("x = 'a\x00b'", "encoding"),
]


@pytest.mark.parametrize("source,rule", HOSTILE, ids=[f"{i}-{r}" for i, (_, r) in enumerate(HOSTILE)])
def test_hostile_source_is_rejected_by_rule(source, rule):
    verdict = check(source)
    assert not verdict.ok
    assert verdict.rule == rule, verdict
    assert verdict.detail


def test_huge_source_is_rejected_by_size():
    src = "x = 1\n" * (DEFAULT_POLICY.max_source_bytes // 6 + 10)
    assert check(src).rule == "size"
    assert check(src.encode()).rule == "size"
    # bytes, not characters: 40k three-byte characters are 120 KB
    assert check("x = '" + "\u20ac" * 40_000 + "'").rule == "size"


def test_invalid_utf8_and_nul_bytes():
    assert check(b"x = '\xff\xfe'").rule == "encoding"
    assert check(b"x = 1\x00").rule == "encoding"
    assert check("x = '\ud800'").rule == "encoding"   # a lone surrogate cannot be UTF-8
    assert check(12345).rule == "encoding"            # not text at all


@pytest.mark.parametrize("source", [
    "x = " + "(" * 10_000 + "1" + ")" * 10_000,        # the tokenizer's nesting limit
    "x = " + "-" * 10_000 + "1",                        # deep unary chain
    "x = " + "1+" * 10_000 + "1",                       # deep left-leaning BinOp tree
    "x = " + "[" * 100 + "]" * 100,                     # parses, but deeper than max_depth
    "def f():\n" + "".join("    " * i + "if x:\n" for i in range(1, 100)) + "    " * 100 + "pass\n",
], ids=["parens", "unary", "binop", "lists", "blocks"])
def test_deep_nesting_is_rejected_without_crashing(source):
    verdict = check(source)
    assert not verdict.ok
    assert verdict.rule in ("nesting", "syntax"), verdict
    if not source.startswith("def"):
        assert verdict.rule == "nesting", verdict


def test_node_count_is_bounded():
    src = "x = [" + "1," * 30_000 + "]"
    assert check(src).rule == "nesting"
    assert check(src, Policy(max_nodes=10**6)).ok


def test_policy_allow_list_is_configurable():
    assert check("import numpy").rule == "import"
    assert check("import numpy", Policy(allowed_imports=frozenset({"numpy"}))).ok


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=2000))
def test_check_never_raises(data):
    verdict = check(data)
    assert isinstance(verdict.ok, bool)
    if not verdict.ok:
        assert verdict.rule


@pytest.mark.parametrize("src", ['x = 1if 1 else 2\n', 'x = [1for i in range(3)]\n',
                                 'x = "\\d"\n'])
def test_odd_literals_are_judged_without_warnings(src):
    # LM output is full of these; each would put a SyntaxWarning or DeprecationWarning
    # into the coordinator's log (the full suite showed them) if parsed plainly.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check(src).ok                    # valid Python, nothing forbidden in it
        assert transformer.parse(src) is None   # not a model source: no design in it
        assert cnn.parse(src) is None


# ----------------------------------------------------------------- string-evaluating calls

def _via(name: str, arg: str = '"__import__(\'os\').system(\'id\')"') -> str:
    """The call reached through a value the gate cannot type (a parameter): only the
    attribute name itself can reject it."""
    return f"def route(lib):\n    return lib.{name}({arg})\n"


# One rejection example per STRING_EVALUATING_CALLS entry, the realistic route where the
# entry is the first thing the gate meets; each is rejected by that entry alone.
STRING_EVALUATION_EXAMPLES = {
    "get_type_hints": "import typing\ndef f(x: \"__import__('os')\"): pass\nh = typing.get_type_hints(f)\n",
    "ForwardRef": "import typing\nr = typing.ForwardRef(\"__import__('os')\")\n",
    "evaluate": _via("evaluate"),
    "evaluate_forward_ref": "import typing\nr = typing.evaluate_forward_ref(\"x\")\n",
    "get_annotations": _via("get_annotations"),
    "fx": "import torch\ng = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))\n",
    "export": "import torch\ne = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))\n",
    "benchmark": "import torch\nbench = torch.utils.benchmark\n",
    "Timer": _via("Timer"),
    "timeit": _via("timeit", "1"),
    "jiterator": "import torch\nf = torch.cuda.jiterator.create_jit_fn(\"template <typename T> T f(T x) { return x; }\")\n",
    "sympify": _via("sympify"),
    "parse_expr": _via("parse_expr"),
    "lambdify": _via("lambdify", '"x", "__import__(\'os\')"'),
    "exec_module": _via("exec_module", "None"),
    "run_code": _via("run_code"),
    "cuda_extension": _via("cuda_extension"),
    "inline": _via("inline"),
    "codegen": _via("codegen"),
    "collect_env": "import torch\ninfo = torch.utils.collect_env.get_pretty_env_info()\n",
    "utils_sympy": _via("utils_sympy"),
    "compile_fx": _via("compile_fx", "None, []"),
    "make_fx": _via("make_fx", "None"),
    "script": _via("script", "None"),
    "trace": _via("trace", "None, ()"),
}


@pytest.mark.parametrize("name", sorted(STRING_EVALUATING_CALLS))
def test_every_string_evaluating_call_has_a_rejection_example(name):
    """Parametrised from the deny-list itself: a new entry without an example fails here,
    and an example rejected for another reason (so that removing the entry would leave
    it rejected) fails too."""
    assert name in STRING_EVALUATION_EXAMPLES, f"no rejection example for {name!r}"
    verdict = check(STRING_EVALUATION_EXAMPLES[name])
    assert not verdict.ok and verdict.rule in ("attribute", "import"), verdict
    assert f"'{name}'" in verdict.detail, verdict
    # and only that entry rejects it: without the name the example is a plain call
    renamed = STRING_EVALUATION_EXAMPLES[name].replace(name, "zeros")
    assert check(renamed).ok, (renamed, check(renamed))


def test_no_example_for_a_name_off_the_list():
    assert set(STRING_EVALUATION_EXAMPLES) == set(STRING_EVALUATING_CALLS)
