"""`selfprog-cli evaluate FILE`: score one source file exactly as a run scores a candidate.

The same path as the loop's evaluation stage (pipeline/stages.py): the policy gate
(`stages.gate`), the run's evaluation job (`RunContext.evaluate_job`, on data prepared
as a run with this task, preset and seed prepares it), the sandbox job task
(`sandbox_task.run_job`: declare-then-score for the self task, predictions scored on the
trusted side for a vision task) and the status words the lineage DB would record
(`stages.outcome`). Nothing is written to the lineage database; the prepared data is
kept under the artifact directory (evaluate-cache/) and reused by the next call.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import click

from pipeline.cli.output import Context, emit_json, handle_errors, json_option, pass_ctx
from pipeline.cli.run import parse_sets
from pipeline.report import fmt_score
from pipeline.settings import SANDBOX_BACKENDS, preset as build_preset


def evaluate_source(settings, config, source: str) -> dict:
    """Score `source` as candidate 1 of iteration 0 of a run with `config` would be
    scored; returns {status, score, reason, param_count, duration_s, task, direction}."""
    from pipeline import celery_app
    from pipeline.jobs import RunContext
    from pipeline.sandbox_task import run_job
    from pipeline.stages import _wire, gate, outcome
    from sandbox.schema import Result

    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    ctx = RunContext(f"evaluate-cache-{digest}", config, settings)
    out = {"task": ctx.task.name, "direction": ctx.task.direction, "score": None,
           "param_count": None, "duration_s": 0.0}
    status, reason = gate(source)
    if status == "rejected":
        return {**out, "status": status, "reason": reason, "evaluation_key": None,
                "key_parts": None, "usage": None}
    celery_app.configure(settings)
    ctx.prepare()
    job = ctx.evaluate_job("lm", 0, 1, source)
    from pipeline.evaluations import key_for
    key, parts = key_for(job, settings)
    res = Result.from_dict(run_job.apply(args=[_wire(job), str(ctx.eval_dir(job))]).get())
    status, reason = outcome(res)
    return {**out, "status": status, "reason": reason, "score": res.score,
            "param_count": res.param_count, "duration_s": res.duration_s,
            "evaluation_key": key, "key_parts": parts, "usage": res.usage}


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--task", default="self", show_default=True,
              help="'self' (few-shot loss of a T5 LM source) or a vision task name "
                   "(accuracy of a CNN source).")
@click.option("--preset", "preset_name", default="quick", show_default=True,
              help="The run configuration whose evaluation is reproduced.")
@click.option("--seed", type=int, help="Random seed (the run's seed).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a run setting, as for launch.")
@click.option("--backend", type=click.Choice(list(SANDBOX_BACKENDS)),
              help="Sandbox backend (default: $SELFPROG_SANDBOX_BACKEND, else auto).")
@json_option
@pass_ctx
@handle_errors
def evaluate(obj: Context, file: Path, task: str, preset_name: str, seed: int | None,
             sets: tuple[str, ...], backend: str | None, as_json: bool) -> None:
    """Score one source FILE as a run scores a candidate; record nothing.

    Prints the status a run would record (evaluated, rejected, invalid, timeout, oom),
    the score, the reason and the parameter count. Exit status 0 when it was scored,
    2 when it was not."""
    overrides = parse_sets(sets)
    if seed is not None:
        overrides["seed"] = seed
    config = build_preset(preset_name, task=task, **overrides)
    settings = obj.settings
    if backend is not None:
        settings = dataclasses.replace(settings, sandbox_backend=backend)
    source = file.read_bytes().decode("utf-8", errors="surrogateescape")
    r = evaluate_source(settings, config, source)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"status:      {r['status']}")
        click.echo(f"score:       {fmt_score(r['score'])}"
                   + (f"  ({r['task']}: {'lower' if r['direction'] == 'min' else 'higher'}"
                      " is better)" if r["score"] is not None else ""))
        click.echo(f"parameters:  {r['param_count'] if r['param_count'] is not None else '-'}")
        if r["reason"]:
            click.echo(f"reason:      {r['reason']}")
        if r["evaluation_key"]:
            click.echo(f"key:         {r['evaluation_key']}")
    if r["status"] != "evaluated":
        raise SystemExit(2)
