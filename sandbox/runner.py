"""The trusted entry point for running one sandbox job: gate first, then a backend.

    result = run(job, out_dir, backend)

A source that breaks the policy comes back as `rejected` with the rule it broke and is
never started. A T5 job (the self task) runs in two fresh sandboxes: `declare` (the
candidate's code, once) then the job itself on harness code only (`_run_declared`).
The caller may pass `templates`, trusted knowledge of sources whose declaration follows
without running them (pipeline/declarations.py); then such a source skips the first
sandbox. Everything that does start goes through `backend.execute`, which always
returns a validated `Result` (ok / invalid / timeout / oom / crashed).
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from sandbox.policy import DEFAULT_POLICY, Policy, check
from sandbox.schema import MAX_REASON_CHARS, Job, Result


def run(job: Job, out_dir: Path, backend, *, gate: bool = True,
        policy: Policy = DEFAULT_POLICY, watch=None, templates=None) -> Result:
    """Gate `job.source`, then run it in `backend`; `out_dir` receives the output files.

    The gate runs before `job.validate()` so that an LM-written source that is huge, has
    NUL bytes or is not encodable ends as `rejected` (a property of the candidate), not
    as a SchemaError (which means the trusted caller built a bad job). `gate=False` is
    for tests of the sandbox itself. `watch` (sandbox/backends/watch.py Watch) hears the
    training losses while the job runs (display only) and can stop it. `templates`
    (an object with `derive(source, params) -> dict | None` and `learn(source, params,
    declaration)`, pipeline/declarations.py) derives declarations it can vouch for.
    """
    if gate:
        verdict = check(job.source, policy)
        if not verdict.ok:
            return Result(job_id=job.job_id, kind=job.kind, status="rejected",
                          reason=f"{verdict.rule}: {verdict.detail}"[:MAX_REASON_CHARS]).validate()
    job.validate()
    if needs_declaration(job):
        return _run_declared(job, Path(out_dir), backend, watch, templates)
    return _execute(backend, job, Path(out_dir), watch)


def needs_declaration(job: Job) -> bool:
    """A T5 job (the self task's LM) with a source: it runs in two steps."""
    return (job.model_kind == "t5" and job.kind in ("train_lm", "generate", "evaluate")
            and job.declaration is None)


def declare_job(job: Job) -> Job:
    """The `declare` job for `job`'s source: no inputs, the same limits. The seed is fixed:
    a declaration says what the source builds, whatever seed the later job trains with.
    Threads and device stay as the job's: with them the declare job has the job's
    pre-warm profile, so both steps draw from one pool (another profile would make the
    pool throw its sandboxes away at every step)."""
    params = {k: v for k, v in job.params.items()
              if k in ("vocab_size", "max_params", "max_batch_size", "num_threads",
                       "device")}
    return Job(job_id=f"{job.job_id[:88]}.declare", kind="declare", source=job.source,
               model_kind=job.model_kind, params=params, limits=job.limits).validate()


# Declarations this process made, by what they depend on (the source and the bounds): an
# iteration's LM source is trained, sampled and scored, each from the same declaration.
# Any declaration is bounded and scored honestly, so reusing one is as safe as making it.
_DECLARED: OrderedDict[str, dict] = OrderedDict()
_DECLARED_MAX = 256


def _declaration_key(d: Job) -> str:
    return hashlib.sha256(json.dumps([d.source, d.model_kind, d.params],
                                     sort_keys=True).encode()).hexdigest()


def _run_declared(job: Job, out_dir: Path, backend, watch, templates=None) -> Result:
    """Two fresh sandboxes: the candidate's code runs once to declare its model and
    learning dynamics (sandbox/schema.py `Declaration`); then `job` runs on harness code
    only, from that declaration. Whatever the first sandbox does, the second computes
    the result: a forgery in the candidate's process can at most declare another
    (bounded, allow-listed) model. A source that cannot be declared is `invalid`."""
    dj = declare_job(job)
    key = _declaration_key(dj)
    declaration, spent = _DECLARED.get(key), 0.0
    declare_usage = None
    if declaration is None and templates is not None:
        declaration = templates.derive(dj.source, dj.params)
    if declaration is None:
        d = _execute(backend, dj, out_dir, watch)
        if d.status != "ok":
            # the candidate's failure is `invalid`, saying so; a timeout, oom or crash (a
            # stopped job included) keeps its own status and reason
            if d.status in ("timeout", "oom", "crashed"):
                return Result.failure(job, d.status, d.reason, logs=d.logs,
                                      duration_s=d.duration_s)
            return Result.failure(job, "invalid", f"cannot be declared: {d.reason}",
                                  logs=d.logs, duration_s=d.duration_s)
        declaration, spent = d.declaration, d.duration_s
        declare_usage = d.usage
        if templates is not None:
            templates.learn(dj.source, dj.params, declaration)
    if key not in _DECLARED:
        _DECLARED[key] = declaration
        while len(_DECLARED) > _DECLARED_MAX:
            _DECLARED.popitem(last=False)
    _DECLARED.move_to_end(key)
    declared = replace(job, source="", declaration=declaration).validate()
    r = _execute(backend, declared, out_dir, watch)
    r.duration_s = round(r.duration_s + spent, 3)
    r.declaration = declaration
    r.usage = combined_usage(r.usage, declare_usage)
    return r.validate()


def combined_usage(job: dict | None, declare: dict | None) -> dict | None:
    """The cost of a job that ran in two sandboxes: seconds add up, memory peaks."""
    if job is None or declare is None:
        return job
    out = dict(job)
    for k in ("wall_s", "cpu_s"):
        if job.get(k) is not None and declare.get(k) is not None:
            out[k] = round(job[k] + declare[k], 3)
    if job.get("peak_rss_mb") is not None and declare.get("peak_rss_mb") is not None:
        out["peak_rss_mb"] = max(job["peak_rss_mb"], declare["peak_rss_mb"])
    return out


def _execute(backend, job: Job, out_dir: Path, watch) -> Result:
    if watch is None:
        return backend.execute(job, out_dir)
    return backend.execute(job, out_dir, watch=watch)
