"""The static gate: every generated source is checked here before any sandbox starts.

This is defence in depth, not the security boundary (the sandbox is). Its job is to
turn away the obvious escapes cheaply and with a stable, recordable reason, so that a
rejected candidate never costs a sandbox start and the lineage DB says which rule it
broke. It never imports, compiles or executes the source: `ast.parse` only.

The accepted language is deliberately small, because both candidate families are small:
a module that imports torch/transformers, builds a model (a `T5Config` call, or an
`nn.Module` subclass with `__init__`/`forward`), and defines `train(model)`.

Rules, each with a stable id (the ``rule`` of a rejected ``Verdict``):

``encoding``   bytes must be UTF-8, text must encode to UTF-8; no NUL byte anywhere.
``size``       at most ``max_source_bytes`` (UTF-8 bytes).
``syntax``     must parse as Python 3.11.
``nesting``    AST depth at most ``max_depth`` and at most ``max_nodes`` nodes. A source
               nested deeply enough to break the parser itself (RecursionError,
               MemoryError, "too many nested parentheses") is rejected here too.
``import``     ``import a.b`` / ``from a.b import c`` only for allow-listed roots; no
               relative imports, no ``import *``; no dotted part or imported name that
               is private (``_x``) or on the attribute deny-list (``from torch import load``).
``dunder``     no name, attribute, keyword, parameter, class name, pattern name or
               imported name of the form ``__x__``, with exactly two exceptions:
               * ``def __init__`` may be *defined* (a FunctionDef name) — nn.Module
                 subclasses need a constructor;
               * ``super().__init__`` / ``super(C, self).__init__`` may be *read*: the
                 attribute ``__init__`` directly on a call of the name ``super``. This is
                 how an nn.Module subclass initialises its base; no other object's
                 ``__init__`` can be reached this way.
               Defining any other dunder method is refused on purpose: ``__torch_function__``,
               ``__getattr__``, ``__eq__``, ``__del__`` ... are hooks that trusted harness
               code would call implicitly, the classic way to make the score lie.
``builtin-call`` no reference at all (not just a call: ``f = eval`` counts) to exec, eval,
               compile, open, input, breakpoint, globals, locals, vars, dir, memoryview,
               help, exit, quit, __import__.
``getattr``    no reference to getattr, setattr, delattr, hasattr: attribute access by
               string would defeat every attribute rule here.
``attribute``  no attribute from a deny-list of names that reach files, pickles, code
               loading, other processes or interpreter internals (``torch.load``,
               ``torch.hub``, ``typing.sys``, ``gen.gi_frame``, ``str.format`` ...),
               library calls that evaluate or compile a string wherever an allowed
               module exposes one (``typing.get_type_hints``, ``torch.fx``,
               ``torch.utils.benchmark.Timer``, ``torch.jit.script`` ...) and file-writing
               methods of array types (``ndarray.tofile``, ``numpy.save``, ``torch.save``).
``private``    no attribute starting with ``_`` except on the plain name ``self``
               (``torch._C``, ``collections._sys`` are the back doors; ``self._x`` is
               ordinary class code).
``attribute-store`` no assignment / augmented assignment / deletion of an attribute
               whose target is rooted in an imported module or in a name that may hold
               one (``torch.nn.functional.cross_entropy = f``, ``F = torch.nn.functional;
               F.cross_entropy = f``); the target's root must be a plain name. This is how
               a candidate would monkeypatch the loss the harness computes in the same
               process. The analysis is flow-insensitive and conservative (see
               `_module_aliases`); it is a speed bump, the harness must still hold its own
               references to the functions that compute scores.
``scope``      no ``global`` / ``nonlocal``: neither family needs them, and keeping
               module-level state out of the accepted language keeps it easy to reason
               about (what the harness calls is what the module defined).
"""
from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass

__all__ = ["Policy", "Verdict", "DEFAULT_POLICY", "check"]


@dataclass(frozen=True)
class Policy:
    """What the gate accepts. Frozen: a policy is a value, recorded with a run."""
    allowed_imports: frozenset[str] = frozenset(
        {"torch", "transformers", "math", "typing", "collections", "functools", "itertools"})
    max_source_bytes: int = 64 * 1024
    max_depth: int = 60
    max_nodes: int = 20_000


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rule: str = ""
    detail: str = ""

    def __bool__(self) -> bool:  # `if check(src):` reads naturally
        return self.ok


_OK = Verdict(True)

# Builtins that execute code, open files, or expose namespaces.
FORBIDDEN_BUILTINS = frozenset({
    "exec", "eval", "compile", "open", "input", "breakpoint", "globals", "locals",
    "vars", "dir", "memoryview", "help", "exit", "quit", "__import__",
})
# Attribute access by string: with these every attribute rule below is moot.
GETATTR_BUILTINS = frozenset({"getattr", "setattr", "delattr", "hasattr"})

# Library calls that evaluate or compile a string as code (the gate never looks inside
# string constants): typing's annotation evaluation, torch.fx/export code generation,
# torch.utils.benchmark's statements, sympy's parser (reached through torch), module
# loaders. tests/sandbox/test_policy.py has a rejection example for every entry.
STRING_EVALUATING_CALLS = frozenset({
    "get_type_hints", "ForwardRef", "evaluate", "evaluate_forward_ref", "get_annotations",
    "fx", "export", "benchmark", "Timer", "timeit", "jiterator", "sympify", "parse_expr",
    "lambdify", "exec_module", "run_code", "cuda_extension", "inline", "codegen",
    "collect_env", "utils_sympy", "compile_fx", "make_fx", "script", "trace",
})

# Attribute names that lead out of "build a model": file and pickle I/O, code loading,
# hub downloads, other processes, and modules that torch/transformers/typing/collections
# re-export as attributes (``torch.os``, ``typing.sys``), plus frame/code internals that
# lead back to builtins without a dunder (``gen.gi_frame.f_globals``).
DENIED_ATTRIBUTES = frozenset({
    # files, pickles, downloads, compiled code
    "load", "loads", "save", "from_file", "from_pretrained", "save_pretrained",
    "push_to_hub", "hub", "jit", "compile", "package", "ops", "classes", "library",
    "cpp_extension", "load_inline", "load_library", "storage", "untyped_storage",
    "multiprocessing", "distributed", "serialization", "dynamic_module_utils",
    # modules reachable as attributes of allowed modules
    "os", "sys", "subprocess", "importlib", "builtins", "ctypes", "socket", "shutil",
    "pathlib", "io", "pickle", "marshal", "glob", "tempfile", "inspect", "gc", "signal",
    "threading", "platform", "types", "runpy", "code", "codeop", "pty", "posix",
    "system", "popen", "spawn", "fork", "execv", "exec", "eval",
    # frames, code objects, tracebacks, class internals
    "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "gi_frame", "gi_code",
    "cr_frame", "cr_code", "ag_frame", "ag_code", "tb_frame", "tb_next", "co_code",
    "func_globals", "mro",
    # format strings read attributes by name: "{0.__class__}".format(x)
    "format", "format_map",
    # library calls that evaluate or compile a string as code: STRING_EVALUATING_CALLS
    *STRING_EVALUATING_CALLS,
    # file writing by allowed array types and configs (numpy through Tensor.numpy(),
    # torch, transformers): only the harness writes files in a sandbox
    "tofile", "dump", "dumps", "savez", "savez_compressed", "savetxt", "memmap",
    "open_memmap", "fromfile", "to_json_file", "from_json_file", "to_file", "write",
    "writelines", "export_chrome_trace", "export_stacks", "onnx", "tensorboard", "profiler",
    "model_zoo", "download_url_to_file",
})


def _is_dunder(name: str | None) -> bool:
    return bool(name) and len(name) > 4 and name.startswith("__") and name.endswith("__")


def parse_untrusted(text: str) -> ast.Module:
    """`ast.parse` for LM-written text, without the SyntaxWarning/DeprecationWarning that
    odd literals (`1if`, `"\\d"`) raise: they would land in the coordinator's log, one
    per candidate. Errors are still raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(text, mode="exec")


def check(source: str | bytes, policy: Policy = DEFAULT_POLICY) -> Verdict:
    """Decide whether `source` may be run in a sandbox. Never raises for any input."""
    # Encoding and size first, on bytes, so a huge or binary input costs nothing more.
    if isinstance(source, (bytes, bytearray)):
        raw = bytes(source)
        if len(raw) > policy.max_source_bytes:
            return Verdict(False, "size", f"{len(raw)} bytes, more than {policy.max_source_bytes}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Verdict(False, "encoding", f"not valid UTF-8 at byte {e.start}")
    elif isinstance(source, str):
        text = source
        if len(text) > policy.max_source_bytes:  # a char is >= 1 byte: cheap early reject
            return Verdict(False, "size", f"{len(text)} characters, more than {policy.max_source_bytes} bytes")
        try:
            raw = text.encode("utf-8")  # strict: lone surrogates are refused
        except UnicodeEncodeError as e:
            return Verdict(False, "encoding", f"not encodable as UTF-8 at character {e.start}")
        if len(raw) > policy.max_source_bytes:
            return Verdict(False, "size", f"{len(raw)} bytes, more than {policy.max_source_bytes}")
    else:
        return Verdict(False, "encoding", f"source must be str or bytes, not {type(source).__name__}")
    if "\x00" in text:
        return Verdict(False, "encoding", "contains a NUL byte")

    try:
        tree = parse_untrusted(text)
    except (RecursionError, MemoryError):
        return Verdict(False, "nesting", "too deeply nested for the parser")
    except SyntaxError as e:
        msg = str(e.msg or "")
        if "too many nested" in msg or "too complex" in msg:
            return Verdict(False, "nesting", msg)
        return Verdict(False, "syntax", f"line {e.lineno}: {msg}"[:300])
    except ValueError as e:  # e.g. source code string cannot contain null bytes
        return Verdict(False, "syntax", str(e)[:300])

    verdict = _check_shape(tree, policy)
    if not verdict.ok:
        return verdict
    # From here the tree is at most max_depth deep, so recursive visitors are safe.
    return _Checker(policy, _module_aliases(tree, policy.allowed_imports)).run(tree)


def _check_shape(tree: ast.AST, policy: Policy) -> Verdict:
    """Depth and node count, iteratively (a recursive walk could itself blow the stack)."""
    stack = [(tree, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > policy.max_nodes:
            return Verdict(False, "nesting", f"more than {policy.max_nodes} AST nodes")
        if depth > policy.max_depth:
            return Verdict(False, "nesting", f"AST deeper than {policy.max_depth}")
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + 1))
    return _OK


def _mentions(expr: ast.AST, names: set[str]) -> bool:
    """Does `expr` carry one of `names` as a value, other than as the callee of a call?

    ``torch.nn.Linear(3, 4)`` does not (its result is a fresh object); ``torch``,
    ``torch.nn``, ``(torch, 1)``, ``f(torch)`` and ``lambda: torch`` do (the module itself
    may come out of it).
    """
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name) and node.id in names:
            return True
        if isinstance(node, ast.Attribute) and "." + node.attr in names:
            return True
        if isinstance(node, ast.Call):
            func = node.func
            while isinstance(func, ast.Attribute):  # skip the callee's own chain
                func = func.value
            if not isinstance(func, ast.Name):
                stack.append(func)
            stack.extend(node.args)
            stack.extend(kw.value for kw in node.keywords)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


def _bound_names(target: ast.AST) -> list[str]:
    """What an assignment target binds: plain names, and ``.attr`` for attribute targets.

    ``self.m = torch`` taints the attribute name ``.m`` (not ``self``): later
    ``self.m.x = f`` or ``g = self.m`` are then treated as module aliases.
    """
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Attribute):
        return ["." + target.attr]
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _bound_names(elt)]
    return []  # a subscript target binds no name


def _module_aliases(tree: ast.AST, seeds: frozenset[str] = frozenset()) -> set[str]:
    """Every name that may hold an imported module (or an attribute of one).

    Flow-insensitive and scope-insensitive on purpose: a name is tainted everywhere if
    any binding of it anywhere may be tainted. Seeds are import bindings; then, to a
    fixed point: assignment targets, loop/with/comprehension targets, walrus targets and
    parameter defaults whose value mentions a tainted name (see `_mentions`), functions
    whose return/yield or lambda body mentions one, and the parameters of a function
    that is called somewhere with a tainted argument.
    """
    tainted: set[str] = set(seeds)  # allowed roots count even unimported (injected globals)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                tainted.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                tainted.add(a.asname or a.name)

    functions: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.setdefault(node.name, []).append(node)

    def params(fn: ast.AST) -> list[str]:
        a = fn.args
        names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
        names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
        return names

    changed = True
    while changed:
        before = len(tainted)
        for node in ast.walk(tree):
            pairs: list[tuple[list[ast.AST], ast.AST]] = []
            if isinstance(node, ast.Assign):
                pairs.append((node.targets, node.value))
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                pairs.append(([node.target], node.value))
            elif isinstance(node, ast.NamedExpr):
                pairs.append(([node.target], node.value))
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                pairs.append(([node.target], node.iter))
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        pairs.append(([item.optional_vars], item.context_expr))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                defaults = [*a.defaults, *(d for d in a.kw_defaults if d is not None)]
                if any(_mentions(d, tainted) for d in defaults):
                    tainted.update(params(node))
                if isinstance(node, ast.Lambda):
                    continue  # a lambda is an expression: its binding is an Assign above
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Return, ast.Yield, ast.YieldFrom)) \
                            and sub.value is not None and _mentions(sub.value, tainted):
                        tainted.add(node.name)
            elif isinstance(node, ast.Call):
                args = [*node.args, *(kw.value for kw in node.keywords)]
                if any(_mentions(x, tainted) for x in args):
                    callee = node.func
                    name = callee.attr if isinstance(callee, ast.Attribute) else \
                        callee.id if isinstance(callee, ast.Name) else None
                    for fn in functions.get(name or "", []):
                        tainted.update(params(fn))
            for targets, value in pairs:
                if _mentions(value, tainted):
                    for t in targets:
                        tainted.update(_bound_names(t))
        changed = len(tainted) != before
    return tainted


class _Checker(ast.NodeVisitor):
    def __init__(self, policy: Policy, module_aliases: set[str]):
        self.policy = policy
        self.aliases = module_aliases
        self.failure: Verdict | None = None

    def run(self, tree: ast.AST) -> Verdict:
        self.visit(tree)
        return _OK if self.failure is None else self.failure

    def fail(self, node: ast.AST, rule: str, detail: str) -> None:
        if self.failure is None:  # report the first broken rule, in source order
            line = getattr(node, "lineno", None)
            self.failure = Verdict(False, rule, f"line {line}: {detail}" if line else detail)

    def generic_visit(self, node: ast.AST) -> None:
        if self.failure is None:
            super().generic_visit(node)

    # --- names --------------------------------------------------------------------
    def _name(self, node: ast.AST, name: str | None, what: str) -> None:
        if _is_dunder(name):
            self.fail(node, "dunder", f"{what} {name!r}")

    def visit_Name(self, node: ast.Name) -> None:
        if _is_dunder(node.id):
            self.fail(node, "dunder", f"name {node.id!r}")
        elif isinstance(node.ctx, ast.Load) and node.id in GETATTR_BUILTINS:
            self.fail(node, "getattr", f"{node.id} (attribute access by string)")
        elif isinstance(node.ctx, ast.Load) and node.id in FORBIDDEN_BUILTINS:
            self.fail(node, "builtin-call", f"{node.id}")
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.name != "__init__":
            self._name(node, node.name, "function")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._name(node, node.name, "class")
        self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        self._name(node, node.arg, "parameter")
        self.generic_visit(node)

    def visit_keyword(self, node: ast.keyword) -> None:
        self._name(node, node.arg, "keyword")
        self.generic_visit(node)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._name(node, node.name, "exception name")
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        self._name(node, node.name, "pattern name")
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        self._name(node, node.name, "pattern name")
        self.generic_visit(node)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self._name(node, node.rest, "pattern name")
        self.generic_visit(node)

    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        for attr in node.kwd_attrs:  # `case C(attr=...)` reads an attribute by name
            self._attr_name(node, attr, None)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.fail(node, "scope", "global statement")

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.fail(node, "scope", "nonlocal statement")

    # --- imports ------------------------------------------------------------------
    def _module_path(self, node: ast.AST, dotted: str) -> None:
        parts = dotted.split(".")
        if parts[0] not in self.policy.allowed_imports:
            self.fail(node, "import", f"module {dotted!r} is not allowed")
            return
        for part in parts[1:]:
            if _is_dunder(part) or part.startswith("_") or part in DENIED_ATTRIBUTES:
                self.fail(node, "import", f"module {dotted!r}: {part!r} is not allowed")
                return

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._module_path(node, a.name)
            self._name(node, a.asname, "import alias")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self.fail(node, "import", "relative import")
            return
        self._module_path(node, node.module or "")
        for a in node.names:
            if a.name == "*":
                self.fail(node, "import", f"'from {node.module} import *'")
            elif _is_dunder(a.name) or _is_dunder(a.asname):
                self.fail(node, "dunder", f"imported name {a.name!r}")
            elif a.name.startswith("_") or a.name in DENIED_ATTRIBUTES:
                self.fail(node, "import", f"'from {node.module} import {a.name}' is not allowed")
        self.generic_visit(node)

    # --- attributes ---------------------------------------------------------------
    def _attr_name(self, node: ast.AST, attr: str, base: ast.AST | None) -> None:
        if _is_dunder(attr):
            self.fail(node, "dunder", f"attribute {attr!r}")
        elif attr in DENIED_ATTRIBUTES:
            self.fail(node, "attribute", f"attribute {attr!r} is not allowed")
        elif attr.startswith("_") and not (isinstance(base, ast.Name) and base.id == "self"):
            self.fail(node, "private", f"private attribute {attr!r} (only on self)")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if not self._is_super_init(node):
            self._attr_name(node, node.attr, node.value)
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._attribute_store(node)
        self.generic_visit(node)

    @staticmethod
    def _is_super_init(node: ast.Attribute) -> bool:
        """``super().__init__`` or ``super(Cls, self).__init__``: the one dunder read allowed."""
        v = node.value
        return (node.attr == "__init__" and isinstance(v, ast.Call)
                and isinstance(v.func, ast.Name) and v.func.id == "super"
                and not v.keywords and len(v.args) in (0, 2)
                and all(isinstance(a, ast.Name) for a in v.args))

    def _attribute_store(self, node: ast.Attribute) -> None:
        root: ast.AST = node.value
        while isinstance(root, (ast.Attribute, ast.Subscript)):
            if isinstance(root, ast.Attribute) and "." + root.attr in self.aliases:
                self.fail(node, "attribute-store",
                          f"assigning an attribute under .{root.attr}, which may hold a module")
                return
            root = root.value
        if not isinstance(root, ast.Name):
            self.fail(node, "attribute-store",
                      "an attribute may only be assigned through a plain name")
        elif root.id in self.aliases:
            self.fail(node, "attribute-store",
                      f"assigning an attribute under {root.id!r}, which may be a module")

    def visit_Subscript(self, node: ast.Subscript) -> None:
        # `torch.nn.functional.__dict__['x'] = f` is caught by dunder; this catches
        # `[torch][0].x = f`-style roots via visit_Attribute; a plain subscript store
        # (`d['k'] = v`) is fine unless its root is a module alias.
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            root: ast.AST = node
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                if isinstance(root, ast.Attribute) and "." + root.attr in self.aliases:
                    self.fail(node, "attribute-store",
                              f"assigning an item under .{root.attr}, which may hold a module")
                    return
                root = root.value
            if isinstance(root, ast.Name) and root.id in self.aliases:
                self.fail(node, "attribute-store",
                          f"assigning an item under {root.id!r}, which may be a module")
        self.generic_visit(node)
