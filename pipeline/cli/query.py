"""Query commands: runs, show, candidates, lineage, plot. They read the lineage
database and never write to it (pipeline/store/api.py: a query never migrates)."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.output import (Context, emit_json, handle_errors, iteration_table,
                                 json_option, pass_ctx, table)
from pipeline.report import (arms_line, candidate_record, direction, fmt_design, fmt_score,
                             fmt_time, lineage_of, provenance, run_detail, run_summary, shorten,
                             task_family)
from pipeline.proposers import names as arm_names
from pipeline.store import CANDIDATE_STATUSES, CandidateView
from pipeline.text import first_line

_CONFIG_SUMMARY = ("iterations", "candidates", "fewshot_samples", "fewshot_epochs",
                   "dataset_size", "d_model", "lm_epochs", "temperature")


@click.command()
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1),
              help="Show at most this many runs, newest first.")
@json_option
@pass_ctx
@handle_errors
def runs(obj: Context, limit: int, as_json: bool) -> None:
    """List runs, newest first.

    Columns: id, task, preset, status, iterations done, best score, creation time.
    The best score is the best selected source over the finished iterations (lowest
    few-shot loss for self-programming, highest accuracy for vision tasks).
    """
    with obj.open_store() as store:
        summaries = [run_summary(store, r.id) for r in store.list_runs(limit)]
    if as_json:
        emit_json(summaries)
        return
    if not summaries:
        click.echo("no runs yet (start one with: selfprog-cli launch)")
        return
    click.echo(table(
        ["id", "task", "preset", "status", "iterations", "best score", "created (UTC)"],
        [[s["id"], s["task"], s["preset"], s["status"], s["iterations_done"],
          fmt_score(s["best_score"]), fmt_time(s["created_at"])] for s in summaries]))

@click.command()
@click.argument("run_id", metavar="RUN")
@json_option
@pass_ctx
@handle_errors
def show(obj: Context, run_id: str, as_json: bool) -> None:
    """Show one run: its configuration and a row per iteration.

    RUN is a run id or a unique prefix of it (at least 4 characters). Each row gives the
    selected source's design parameters and score, the incumbent's score (the current
    source scored the same way), whether the source was kept or replaced, and how many
    generated candidates were evaluated.
    """
    with obj.open_store() as store:
        detail = run_detail(store, run_id)
    if as_json:
        emit_json(detail)
        return
    run, rows = detail, detail["iterations"]
    click.echo(f"run {run['id']}  task={run['task']}  preset={run['preset']}  "
               f"seed={run['seed']}  status={run['status']}")
    click.echo(f"created {fmt_time(run['created_at'])} UTC   "
               f"finished {fmt_time(run['finished_at'])}")
    summary = " ".join(f"{k}={run['config'][k]}" for k in _CONFIG_SUMMARY if k in run["config"])
    if summary:
        click.echo(f"config: {summary}   (--json for all of it)")
    if run["error"]:
        click.echo(f"error: {shorten(run['error'], 200)}")
    evaluations = detail["evaluations"]
    click.echo(f"evaluations: {evaluations['sandbox']} in a sandbox "
               f"({_seconds(evaluations['sandbox_wall_s'])} wall, "
               f"{_seconds(evaluations['sandbox_cpu_s'])} CPU), {evaluations['reused']} reused "
               f"({_seconds(evaluations['saved_wall_s'])} saved)")
    click.echo("")
    click.echo(iteration_table(rows, task_family(run["task"])) if rows else "no iterations yet")
    if len({r["arm"] for r in rows}) > 1:
        click.echo("")
        click.echo("arms, seed score -> selected score: " + arms_line(detail["arms"]))


def _arm(value: str | None) -> str | None:
    # checked when the command runs, so that a proposer registered later is known too
    if value is not None and value not in arm_names():
        raise click.BadParameter(f"{value!r} is not an arm; arms: {', '.join(arm_names())}",
                                 param_hint="--arm")
    return value


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--status", type=click.Choice(CANDIDATE_STATUSES),
              help="Only candidates in this state.")
@click.option("--iteration", type=int, help="Only candidates of this iteration.")
@click.option("--arm", callback=lambda _c, _p, v: _arm(v),
              help="Only this arm (its proposer, pipeline/proposers/): 'lm' (the LM), 'random' "
                   "(the baseline) or 'lineage' (the LM fine-tuned on the run's own lineage).")
@json_option
@pass_ctx
@handle_errors
def candidates(obj: Context, run_id: str, status: str | None, iteration: int | None,
               arm: str | None, as_json: bool) -> None:
    """List the candidates of a run with their fate.

    RUN is a run id or a unique prefix of it. Index 0 of each iteration is the
    incumbent (the current source, scored the same way); 1..n were generated.
    --json prints every column, sources and logs included.
    """
    with obj.open_store() as store:
        run = store.get_run(run_id)
        rows = store.candidates(run.id, status=status, iteration=iteration, arm=arm)
        evaluations = store.evaluations(run.id)
    if as_json:
        emit_json([candidate_record(c, evaluations) for c in rows])
        return
    if not rows:
        click.echo("no candidates match")
        return
    click.echo(table(
        ["id", "arm", "it", "idx", "role", "status", "score", "params", "eval", "cpu s",
         "rss MiB", "reason"],
        [[c.id, c.arm, c.iteration, c.index, c.role, c.status, fmt_score(c.score),
          "-" if c.param_count is None else f"{c.param_count:,}", *_cost(c, evaluations),
          shorten(c.reason)] for c in rows]))
    click.echo("eval: the evaluation key's first 8 hex digits; 'reused': its stored outcome, "
               "no sandbox; cpu s and rss MiB: what its sandbox cost")


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}s"


def _cost(c: CandidateView, evaluations: dict) -> list[str]:
    """The candidates table's provenance columns."""
    p = provenance(c, evaluations)
    if p is None:
        return ["-", "-", "-"]
    key = p["key"][:8] + (" reused" if c.reused else "")
    if c.reused:
        return [key, "-", "-"]
    return [key, "-" if p["cpu_s"] is None else f"{p['cpu_s']:.1f}",
            "-" if p["peak_rss_mb"] is None else f"{p['peak_rss_mb']:.0f}"]

@click.command()
@click.argument("candidate_id", metavar="CANDIDATE", type=int)
@json_option
@pass_ctx
@handle_errors
def lineage(obj: Context, candidate_id: int, as_json: bool) -> None:
    """Show the ancestry of a candidate, from the seed source to it.

    CANDIDATE is a candidate id (see `candidates RUN`). Each step shows the candidate,
    its iteration, score and design, and a unified diff of its source against the
    previous step. Steps whose source is unchanged (an incumbent copying the previous
    winner) show no diff.
    """
    with obj.open_store() as store:
        _, steps = lineage_of(store, candidate_id)
        family = task_family(store.get_run(steps[-1]["run_id"]).task)
    if as_json:
        emit_json(steps)
        return
    click.echo(f"lineage of candidate {candidate_id}: {len(steps)} step(s), seed first")
    for number, c in enumerate(steps, 1):
        click.echo("")
        click.echo(f"[{number}] candidate {c['id']}  run {c['run_id']}  iteration "
                   f"{c['iteration']}  index {c['index']} ({c['role']}, {c['arm']})  "
                   f"{c['status']}  score {fmt_score(c['score'])}")
        click.echo(f"    design: {fmt_design(c['design'], family)}")
        p = c["evaluation"]
        if p is not None:
            click.echo(f"    evaluation {p['key'][:16]}{' (reused)' if c['reused'] else ''}: "
                       f"{p['backend']} on {p['host']}, {_seconds(p['wall_s'])} wall, "
                       f"{_seconds(p['cpu_s'])} CPU, peak {p['peak_rss_mb']} MiB")
        if c["diff"]:
            click.echo(c["diff"].rstrip("\n"))


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the PNG files (created if missing). "
                   "Default: <artifact-dir>/<run id>/plots.")
@json_option
@pass_ctx
@handle_errors
def plot(obj: Context, run_id: str, out_dir: Path | None, as_json: bool) -> None:
    """Draw a run's figures as PNG files and print their paths.

    lm_loss.png: the LM's training loss per step, one line per iteration (the paper's
    Figure 2). score.png: the selected source's score and the incumbent's score per
    iteration. copying.png: how well each iteration's LM copies its input, and the shares
    of samples that change one parameter and that repeat a move which improved before.
    search.png: each arm's best score against the evaluations it spent.

    Runs on a vision task also get candidate_loss.png (training loss of the network
    selected at each iteration, the paper's Figure 3), design_params.png (average
    design parameters of the evaluated candidates per iteration, widths as log2,
    Figure 5) and best_params.png (parameter count of the selected model, Figure 6),
    each with one line or panel per arm. Figure 4 comes from `selfprog-cli sweep`.
    """
    from pipeline import plots   # matplotlib is slow to import; only this command needs it

    with obj.open_store() as store:
        run = store.get_run(run_id)
        its, cands, curves = (store.iterations(run.id), store.candidates(run.id),
                              store.curves(run.id))
    out = out_dir if out_dir is not None else obj.settings.artifacts / run.id / "plots"
    try:
        paths = plots.plot_run(run, its, cands, curves, out)
        if direction(run.task) == "max":   # a vision task
            paths += plots.plot_vision_run(run, its, cands, curves, out)
    except OSError as exc:
        raise click.ClickException(
            f"cannot write plots to {str(out)!r}: {exc.strerror or first_line(exc)}") from None
    if as_json:
        emit_json({"run_id": run.id, "files": [str(p) for p in paths]})
    else:
        for p in paths:
            click.echo(str(p))
