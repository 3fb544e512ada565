"""What goes into a sandbox: exactly the modules named by sandbox/protocol.py SANDBOX_MODULES.

The same tuple drives the staging of every job's lib/ (sandbox/backends/staging.py), the
sandbox image's build context (scripts/build-images.sh) and the harness's integrity
snapshot (sandbox/guards.py). A new top-level module of the package goes into none of
them until it is named there.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.backends import staging
from sandbox.protocol import SANDBOX_MODULES, module_files

PACKAGE = Path(staging.__file__).resolve().parent.parent
# Top-level modules of the package that are trusted-side code and never enter a sandbox.
TRUSTED_ONLY = {"canary", "policy", "runner"}


def staged_files(jobdir: Path) -> set[str]:
    return {p.name for p in (jobdir / "lib" / "sandbox").iterdir()}


def test_staging_copies_exactly_the_sandbox_modules(tmp_path):
    jobdir = staging.stage_skeleton(tmp_path / "work", "t-")
    try:
        assert staged_files(jobdir) == set(module_files())
        assert not (jobdir / "lib" / "sandbox" / "backends").exists()
        for name in module_files():
            assert (jobdir / "lib" / "sandbox" / name).read_bytes() == (PACKAGE / name).read_bytes()
    finally:
        staging.cleanup(jobdir)


def test_a_new_module_is_not_staged_silently(tmp_path, monkeypatch):
    copy = tmp_path / "sandbox"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "extra.py").write_text("SECRET = 1\n")
    monkeypatch.setattr(staging, "PACKAGE_DIR", copy)
    jobdir = staging.stage_skeleton(tmp_path / "work", "t-")
    try:
        assert "extra.py" not in staged_files(jobdir)
        assert staged_files(jobdir) == set(module_files())
    finally:
        staging.cleanup(jobdir)


def test_every_top_level_module_is_placed_on_one_side():
    found = {p.stem for p in PACKAGE.glob("*.py")}
    assert set(SANDBOX_MODULES) <= found, "SANDBOX_MODULES names a module that does not exist"
    unplaced = found - set(SANDBOX_MODULES) - TRUSTED_ONLY
    assert not unplaced, (f"sandbox/{sorted(unplaced)[0]}.py: name it in sandbox/protocol.py "
                          "SANDBOX_MODULES (it runs inside sandboxes) or in TRUSTED_ONLY here")
    assert not set(SANDBOX_MODULES) & TRUSTED_ONLY


def test_sandbox_modules_import_only_sandbox_modules():
    """What runs in a sandbox finds every `sandbox.*` import it makes in lib/."""
    staged = {"sandbox" if m == "__init__" else f"sandbox.{m}" for m in SANDBOX_MODULES}
    for name in module_files():
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sandbox"):
                assert node.module in staged, f"{name} imports {node.module}, which is not staged"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("sandbox"):
                        assert alias.name in staged, f"{name} imports {alias.name}"


def test_the_image_build_reads_the_same_tuple():
    out = subprocess.run([sys.executable, str(PACKAGE / "protocol.py")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == module_files()
    script = (PACKAGE.parent / "scripts" / "build-images.sh").read_text()
    assert "python3 sandbox/protocol.py" in script and "cp sandbox/*.py" not in script


def test_the_integrity_snapshot_covers_every_sandbox_module():
    pytest.importorskip("torch")
    import sandbox.harness  # noqa: F401  (imports guards, training, protocol, schema)
    from sandbox import guards, training
    from sandbox.guards import CandidateError, Integrity

    integrity = Integrity()
    labels = set(integrity.snapshot)
    for m in SANDBOX_MODULES:
        assert ("sandbox" if m == "__init__" else f"sandbox.{m}") in labels, m
    assert "sandbox.guards.Integrity" in labels and "sandbox.schema.Result" in labels
    original = training.mean_loss
    training.mean_loss = lambda xs: 0.0
    try:
        with pytest.raises(CandidateError, match="sandbox.training.mean_loss"):
            integrity.check()
    finally:
        training.mean_loss = original
    integrity.check()
    assert guards.Integrity is Integrity
