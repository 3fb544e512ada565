"""What the families' sources share: design parameters written as module-level integer
constants (`HIDDEN_SIZE = 64`), one literal each, read back by parsing, never by running."""
from __future__ import annotations

import ast
import io
import tokenize

from sandbox.policy import parse_untrusted


def parse_module(source: str) -> ast.Module | None:
    """The source's AST, or None when it does not parse (a generated candidate may not)."""
    try:
        return parse_untrusted(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):   # a source nested past
        return None                                                   # the parser's limits


def int_constants(tree: ast.Module) -> dict[str, int]:
    """Module-level `NAME = <int literal>` assignments; a name assigned twice keeps the
    last value, as running the module would."""
    found: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and is_int(node.value):
            found[node.targets[0].id] = node.value.value
    return found


def number_constants(tree: ast.Module) -> dict[str, int | float]:
    """As int_constants, with float literals too (a learning rate)."""
    found: dict[str, int | float] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant) \
                and type(node.value.value) in (int, float):
            found[node.targets[0].id] = node.value.value
    return found


def is_int(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, int) \
        and not isinstance(node.value, bool)


def constants_block(values: dict[str, int]) -> str:
    """The constants as the sources write them, one per line."""
    return "".join(f"{name} = {value}\n" for name, value in values.items())


def call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def int_literals(source: str) -> list[str] | None:
    """The integer literals of a source, as written, in source order; None when the
    text does not tokenize. Two sources of one family differ by one refinement when
    these lists differ in exactly one place."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    return [t.string for t in tokens if t.type == tokenize.NUMBER and t.string.isdigit()]
