#!/usr/bin/env bash
# The process sandbox's Python environment (sandbox/backends/runtime.py): the sandbox
# image's package set only, hard-linked from the trusted virtual environment (seconds,
# no network). Rebuilt when the trusted environment changes (make setup).
#   bash scripts/sandbox-runtime.sh [VENV_PYTHON] [PREFIX]
set -euo pipefail
PY=${1:-/opt/selfprog/venv/bin/python}
PREFIX=${2:-${SELFPROG_SANDBOX_PYTHON_PREFIX:-/opt/selfprog/sandbox-runtime}}
cd "$(dirname "$0")/.."
PYTHONPATH=$PWD "$PY" -m sandbox.backends.runtime build "$PREFIX"
