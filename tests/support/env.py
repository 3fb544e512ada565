"""What the environment must provide, and what happens when it does not.

On a developer's machine a missing piece (root, a server) skips the tests that need it,
with the reason; under CI (the CI variable set) it fails them instead, so that CI can
never go green having tested less than it says.
"""
from __future__ import annotations

import glob
import os
import shutil

import pytest


def missing(reason: str) -> None:
    """Skip with `reason`, or fail with it in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_root(what: str = "this test") -> None:
    if os.geteuid() != 0:
        missing(f"{what} needs root")


def host_c_compilers() -> list[str]:
    """The C compilers on this host, by absolute path (what an attack tries to reach)."""
    found = [shutil.which(cc) for cc in ("cc", "gcc", "clang", "tcc")]
    return sorted({p for p in found + glob.glob("/usr/lib/llvm-*/bin/clang") if p})
