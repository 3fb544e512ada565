"""The sandbox protocol: what a backend and the harness inside a sandbox agree on.

A job directory (sandbox/backends/staging.py makes it, docs/CONTRACTS.md describes it):

    job.json        the job (sandbox/schema.py), inputs rewritten to in/<name>.safetensors
    in/             the input tensors, read-only
    lib/sandbox/    the modules named by SANDBOX_MODULES, read-only
    out/            the only place the sandbox writes results: result.json, result.seal,
                    progress.jsonl, declared outputs
    tmp/            HOME, TMPDIR and caches

The backend starts `python -I -c HARNESS_COMMAND` in it (a pre-warmed sandbox:
WARM_COMMAND with its arguments, then "go"). Pure standard library: this module is one
of SANDBOX_MODULES and is also read by scripts/build-images.sh.
"""
from __future__ import annotations

import hashlib
import hmac

# The modules of the `sandbox` package that run inside a sandbox: copied into every
# job's lib/sandbox/ (sandbox/backends/staging.py), into the sandbox image's build
# context (scripts/build-images.sh) and covered by the harness's integrity snapshot
# (sandbox/guards.py). Nothing else of the package goes in: the gate, the canary and
# the backends are trusted-side code. A new module the harness needs must be named here.
SANDBOX_MODULES = ("__init__", "protocol", "schema", "guards", "training", "lm_schedule",
                   "finetune", "seccomp", "harness")

# Names in a job directory.
JOB_FILE = "job.json"
IN_DIR = "in"
LIB_DIR = "lib"
OUT_DIR = "out"
TMP_DIR = "tmp"
RESULT_FILE = "result.json"      # in out/: the harness's result (sandbox/schema.py Result)
SEAL_KEY_FILE = ".seal-key"      # in out/: written by the backend, removed by the harness
SEAL_FILE = "result.seal"        # in out/: hex HMAC-SHA256, see seal_digest()
PROGRESS_FILE = "progress.jsonl"  # in out/: {"step": n, "loss": x} lines while fit() trains
READY_FILE = ".warm-ready"       # in out/: warm_main(ready="file") has imported, waits for "go"
GO_FILE = "go"                   # in the job dir: the backend's "go" to a warm sandbox
STDOUT_FILE = "stdout"           # in the job dir (process backend): the sandbox's logs
STDERR_FILE = "stderr"

GO_POLL_S = 0.01                 # how often a warm sandbox looks for GO_FILE
PROGRESS_EVERY_S = 0.5           # at most two progress lines a second: display only

SETUP_EXIT_CODE = 3              # the sandbox cannot run the job at all (not the candidate)
SETUP_ERROR_PREFIX = "selfprog-setup-error: "   # the stderr line that says why
SEAL_CONTEXT = b"selfprog-result-seal-v1\x00"

# What every backend runs inside the job directory (cwd).
HARNESS_COMMAND = "import sys; sys.path.insert(0, 'lib'); from sandbox.harness import main; main('.')"
# A pre-warmed sandbox: imports, waits for "go", then runs the same main('.'); its
# arguments (model kind, device, ready signal) follow the command (harness.warm_main).
WARM_COMMAND = ("import sys; sys.path.insert(0, 'lib'); from sandbox.harness import warm_main; "
                "warm_main('.', *sys.argv[1:])")


def seal_digest(key: bytes, result_bytes: bytes, outputs: list[tuple[str, str]]) -> str:
    """HMAC-SHA256 over the result document and (name, sha256 hex) of each output.

    The harness seals `out/result.json` with it; the backend computes it again
    (sandbox/backends/collect.py) to check that the result and the declared outputs
    are the ones the harness wrote.
    """
    mac = hmac.new(key, SEAL_CONTEXT, hashlib.sha256)
    mac.update(len(result_bytes).to_bytes(8, "little") + result_bytes)
    for name, digest in outputs:
        mac.update(b"\x00" + name.encode() + b"\x00" + digest.encode())
    return mac.hexdigest()


def module_files() -> list[str]:
    """SANDBOX_MODULES as file names relative to the package directory."""
    return [f"{name}.py" for name in SANDBOX_MODULES]


if __name__ == "__main__":   # scripts/build-images.sh: the files to put into the image
    print("\n".join(module_files()))
