"""The trusted entry point for running one sandbox job: gate first, then a backend.

    result = run(job, out_dir, backend)

A source that breaks the policy comes back as `rejected` with the rule it broke and is
never started. Everything that does start goes through `backend.execute`, which always
returns a validated `Result` (ok / invalid / timeout / oom / crashed).
"""
from __future__ import annotations

from pathlib import Path

from sandbox.policy import DEFAULT_POLICY, Policy, check
from sandbox.schema import MAX_REASON_CHARS, Job, Result


def run(job: Job, out_dir: Path, backend, *, gate: bool = True,
        policy: Policy = DEFAULT_POLICY, watch=None) -> Result:
    """Gate `job.source`, then run it in `backend`; `out_dir` receives the output files.

    The gate runs before `job.validate()` so that an LM-written source that is huge, has
    NUL bytes or is not encodable ends as `rejected` (a property of the candidate), not
    as a SchemaError (which means the trusted caller built a bad job). `gate=False` is
    for tests of the sandbox itself. `watch` (sandbox/backends/watch.py Watch) hears the
    training losses while the job runs (display only) and can stop it.
    """
    if gate:
        verdict = check(job.source, policy)
        if not verdict.ok:
            return Result(job_id=job.job_id, kind=job.kind, status="rejected",
                          reason=f"{verdict.rule}: {verdict.detail}"[:MAX_REASON_CHARS]).validate()
    job.validate()
    if watch is None:
        return backend.execute(job, Path(out_dir))
    return backend.execute(job, Path(out_dir), watch=watch)
