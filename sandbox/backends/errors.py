"""The backends' one error type, in a leaf module: every backend module imports it from
here, so none imports the package (sandbox/backends/__init__.py), which chooses them."""
from __future__ import annotations


class SandboxError(RuntimeError):
    """The trusted side cannot run a job (bad input file, sandbox not usable)."""
