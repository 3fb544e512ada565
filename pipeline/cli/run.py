"""Run commands: launch, watch, cancel, resume, sweep."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import click

from pipeline import sweep as sweeps
from pipeline.cli.output import (Context, emit_json, handle_errors, iteration_table,
                                 json_option, pass_ctx, print_progress, progress_for, table)
from pipeline.report import fmt_score, iteration_rows, shorten, task_family
from pipeline.settings import SANDBOX_BACKENDS, ConfigError, Settings, preset as build_preset
from pipeline.store import RUN_TERMINAL_STATUSES, LineageStore
from pipeline.text import first_line, hide_password


def parse_sets(values: Sequence[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = value.strip()
    return overrides


@click.command()
@click.option("--preset", "preset_name", default="quick", show_default=True,
              help="Starting configuration: 'quick' (the LM learns to edit its input; "
                   "a self run in ~5 minutes on a 2-core CPU), 'smoke' (every stage in about "
                   "a minute, the LM does not learn to edit: for trying the service), "
                   "'paper' (the paper's section 4.1 setting, for a GPU) or "
                   "'paper-vision-cpu' (vision tasks on a CPU, with the random control arm).")
@click.option("--task", default="self", show_default=True,
              help="'self': the LM programs itself; or a vision task name for "
                   "programming other AI.")
@click.option("--seed", type=int, help="Random seed (datasets, sampling, training).")
@click.option("--iterations", type=int, help="Number of reprogramming iterations.")
@click.option("--candidates", type=int, help="Candidates sampled per iteration (n).")
@click.option("--fewshot-samples", type=int,
              help="Samples for the extended few-shot evaluation of each candidate.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any run setting (a RunConfig field), e.g. --set lm_epochs=2. "
                   "Repeatable; the dedicated options above win over --set.")
@click.option("--backend", type=click.Choice(list(SANDBOX_BACKENDS)),
              help="Sandbox backend for generated code (default: $SELFPROG_SANDBOX_BACKEND, "
                   "else auto: Docker when available, else local processes under "
                   "bubblewrap, else an error). process-unconfined: local processes "
                   "without bubblewrap, WEAKER, only by name. Embedded runs only: workers "
                   "use their own setting.")
@click.option("--detach", is_flag=True,
              help="With a broker ($SELFPROG_BROKER_URL): submit the run, print its id and "
                   "return at once (follow it with `watch RUN`).")
@json_option
@pass_ctx
@handle_errors
def launch(obj: Context, preset_name: str, task: str, seed: int | None,
           iterations: int | None, candidates: int | None, fewshot_samples: int | None,
           sets: tuple[str, ...], backend: str | None, detach: bool, as_json: bool) -> None:
    """Start a self-programming run and wait for it to finish.

    Without a broker the run executes in this process (the embedded default). With
    $SELFPROG_BROKER_URL set it is submitted to the coordinator and this command
    follows it (Ctrl-C stops following, not the run), or returns at once with --detach.
    With a broker, a queue (coordinator, trainer, sandbox) that no live worker consumes
    is an error said within seconds, before any run is created (--detach: a warning,
    the run waits for the workers).

    Progress goes to stderr, one line per event. At the end the run id and a summary
    per iteration (the selected source's design, its score, kept or replaced) are
    printed; with --json, one JSON object.
    """
    overrides: dict[str, Any] = parse_sets(sets)
    overrides.update({k: v for k, v in dict(task=task, seed=seed, iterations=iterations,
                                            candidates=candidates,
                                            fewshot_samples=fewshot_samples).items()
                      if v is not None})
    config = build_preset(preset_name, **overrides)
    settings = obj.settings
    if detach and settings.embedded:
        raise click.ClickException("--detach needs a broker: set SELFPROG_BROKER_URL "
                                   "(an embedded run lives in this process)")
    if backend is not None:
        if not settings.embedded:
            click.echo("warning: --backend is ignored with a broker; the workers use their "
                       "own SELFPROG_SANDBOX_BACKEND", err=True)
        settings = dataclasses.replace(settings, sandbox_backend=backend)
    # Open (and create or migrate) the database before the long part starts, so a bad
    # URL fails in a second, not after the first training stage.
    obj.open_store(create=True).close()
    _check_broker(settings)
    _check_workers(settings, detach=detach, nothing="no run was created")

    from pipeline.runs import launch as launch_run   # heavy (torch); only this command

    run_id = launch_run(settings, config, progress=None if detach else progress_for(config.task),
                        detach=detach)
    if detach:
        _report_submitted(run_id, as_json)
        return
    _report_run(settings, run_id, as_json)


def _check_broker(settings: Settings) -> None:
    """Fail in a second, with one line, when the broker does not answer."""
    if settings.embedded:
        return
    import redis
    try:
        redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5,
                             socket_timeout=5).ping()
    except (redis.RedisError, ValueError) as exc:
        raise click.ClickException(f"broker {hide_password(settings.broker_url)} does not "
                                   f"answer: {first_line(exc)}") from None


WORKER_REPLY_S = 2.0     # how long live workers get to say which queues they consume
WORKER_WAIT_S = 10.0     # how long a worker that is still starting gets to show up


def _check_workers(settings: Settings, *, detach: bool, nothing: str) -> None:
    """With a broker: a run needs a live worker on each queue, or it would wait there
    forever without a word. Following, that is an error (said within seconds, and
    `nothing` tells what was left behind); detached, a warning (the run waits for them)."""
    if settings.embedded:
        return
    from pipeline.celery_app import configure, queue_consumers, worker_command
    deadline = time.monotonic() + (0.0 if detach else WORKER_WAIT_S)
    while True:
        try:
            configure(settings)
            consumers = queue_consumers(timeout=WORKER_REPLY_S)
        except Exception as exc:   # noqa: BLE001 - the broker answered a ping a moment ago
            click.echo(f"warning: could not ask which workers are live: {first_line(exc)}",
                       err=True)
            return
        missing = [q for q, names in consumers.items() if not names]
        if not missing:
            return
        if time.monotonic() >= deadline:   # workers that are starting answer within it
            break
        time.sleep(1.0)
    what = (f"no live worker consumes queue(s) {', '.join(repr(q) for q in missing)} on "
            f"{hide_password(settings.broker_url)}")
    start = "; ".join(worker_command(q) for q in missing)
    if detach:
        click.echo(f"warning: {what}; the run waits until one starts ({start})", err=True)
        return
    raise click.ClickException(f"{what}: {nothing}. Start the worker(s) ({start}) and try "
                               "again, or use --detach to submit it to wait for them")


def _report_submitted(run_id: str, as_json: bool) -> None:
    if as_json:
        emit_json({"run_id": run_id, "status": "submitted"})
    else:
        click.echo(run_id)


def _report_run(settings: Settings, run_id: str, as_json: bool) -> None:
    with LineageStore(settings.database_url) as store:
        run = store.get_run(run_id)
        rows = iteration_rows(store.iterations(run.id), store.candidates(run.id))
    if as_json:
        emit_json({"run_id": run.id, "status": run.status, "error": run.error,
                   "iterations": rows})
        return
    click.echo(f"run {run.id}: {run.status}" + (f" ({shorten(run.error, 200)})"
                                                 if run.error else ""))
    click.echo(iteration_table(rows, task_family(run.task)) if rows else "no iterations")
    click.echo(f"\nnext: selfprog-cli show {run.id} | selfprog-cli plot {run.id}")
    if run.status == "failed":
        raise click.ClickException(f"run {run.id} failed: {shorten(run.error or '', 300)}")


def _needs_broker(settings: Settings, what: str) -> None:
    if settings.embedded:
        raise click.ClickException(f"{what} follows runs on the workers: set "
                                   "SELFPROG_BROKER_URL (embedded runs report progress in "
                                   "the process that launched them; see `show RUN`)")


@click.command()
@click.argument("run_id", metavar="RUN")
@json_option
@pass_ctx
@handle_errors
def watch(obj: Context, run_id: str, as_json: bool) -> None:
    """Follow a run on the workers: its live events until it ends.

    RUN is a run id or a unique prefix. Prints where the run stands now, then one line
    per event (stage changes, candidates, iterations) on stderr; with --json, one JSON
    object per event on stdout. Exits 0 when the run completes, 1 when it failed or was
    cancelled. Ctrl-C stops watching, not the run.
    """
    settings = obj.settings
    _needs_broker(settings, "watch")
    with obj.open_store() as store:
        run = store.get_run(run_id)
        rows = iteration_rows(store.iterations(run.id), store.candidates(run.id))
    _check_broker(settings)
    family = task_family(run.task)
    if not as_json:
        click.echo(f"run {run.id}: {run.status}", err=True)
        if rows:
            click.echo(iteration_table(rows, family), err=True)

    def show_event(event: str, info: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps({"event": event, **info}, default=str))
        else:
            print_progress(event, info, family)

    status = run.status
    if status not in RUN_TERMINAL_STATUSES:
        from pipeline.runs import attach   # heavy (torch)
        try:
            status = attach(settings, run.id, show_event)
        except KeyboardInterrupt:
            raise click.ClickException(f"stopped watching; run {run.id} goes on") from None
    with LineageStore(settings.database_url) as store:
        final = store.get_run(run.id)
    if as_json:
        click.echo(json.dumps({"event": "end", "run_id": final.id, "status": final.status,
                               "error": final.error}))
    else:
        click.echo(f"run {final.id}: {final.status}")
    if final.status != "completed":
        raise click.ClickException(f"run {final.id} {final.status}"
                                   + (f": {shorten(final.error, 200)}" if final.error else ""))

@click.command()
@click.argument("run_id", metavar="RUN")
@json_option
@pass_ctx
@handle_errors
def cancel(obj: Context, run_id: str, as_json: bool) -> None:
    """Cancel a run: no new stage starts, unfinished candidates end as 'cancelled'.

    RUN is a run id or a unique prefix. Jobs already in a sandbox are stopped within a
    few seconds (through Redis; embedded, through the lineage DB); their results are
    not recorded. A finished run cannot be cancelled.
    """
    with obj.open_store() as store:
        run = store.get_run(run_id)
    from pipeline.runs import cancel as cancel_run   # heavy (torch)

    n = cancel_run(obj.settings, run.id)
    if as_json:
        emit_json({"run_id": run.id, "status": "cancelled", "candidates_cancelled": n})
    else:
        click.echo(f"run {run.id}: cancelled ({n} unfinished candidate(s) cancelled)")

@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--detach", is_flag=True,
              help="With a broker: hand the run back to the coordinator and return at once.")
@click.option("--anyway", is_flag=True,
              help="Resume a cancelled run: take the cancel back (the run's status, its "
                   "cancelled candidates and the flag that stops its running jobs).")
@json_option
@pass_ctx
@handle_errors
def resume(obj: Context, run_id: str, detach: bool, anyway: bool, as_json: bool) -> None:
    """Carry on an interrupted run from what the lineage database records.

    For a run stopped by a crash, a lost broker (Redis restarted without its data) or a
    stage failure: every unfinished iteration restarts at its recorded stage, and
    candidates already in a final state are not run again. Safe on a run that is still
    moving (nothing is recorded twice). A completed run is left alone. A cancel is
    final: a cancelled run is refused unless --anyway. Then waits like `launch` (or
    returns at once with --detach); with a broker, fails at once when a queue has no
    live worker (--detach: warns).
    """
    settings = obj.settings
    if detach and settings.embedded:
        raise click.ClickException("--detach needs a broker: set SELFPROG_BROKER_URL")
    with obj.open_store() as store:
        run = store.get_run(run_id)
    from pipeline.runs import check_resumable, resume as resume_run   # heavy (torch)

    check_resumable(run.id, run.status, anyway=anyway)
    _check_broker(settings)
    if run.status != "completed":
        _check_workers(settings, detach=detach,
                       nothing=f"run {run.id} was left {run.status} as it was")
    resume_run(settings, run.id, progress=None if detach else progress_for(run.task), detach=detach,
               anyway=anyway)
    if detach:
        _report_submitted(run.id, as_json)
        return
    _report_run(settings, run.id, as_json)


@click.command()
@click.option("--task", required=True, help="Vision task, e.g. digits, mnist5k, mnist1d.")
@click.option("--candidates", "candidates_csv", default="2,4,8", show_default=True,
              metavar="N,N,...", help="Candidates per iteration, one grid axis.")
@click.option("--iterations", "iterations_csv", default="1,2,3", show_default=True,
              metavar="N,N,...", help="Iterations per run, the other grid axis.")
@click.option("--preset", "preset_name", default="quick", show_default=True,
              help="Starting configuration of every cell (see launch).")
@click.option("--seed", type=int, help="Random seed of every cell.")
@click.option("--name", help="Sweep name, stored in each cell's run config as 'sweep'. "
                             "Cells of this name that already completed are reused, so "
                             "re-running a sweep resumes it and redraws its figure. "
                             "Default: a new name.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any run setting of every cell (repeatable).")
@click.option("--backend", type=click.Choice(list(SANDBOX_BACKENDS)),
              help="Sandbox backend (see launch).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file for the figure. Default: <artifact-dir>/sweeps/<name>.png.")
@click.option("--no-launch", is_flag=True,
              help="Launch nothing: print the table and draw the figure from the cells of "
                   "--name that completed (a partial sweep shows what finished).")
@json_option
@pass_ctx
@handle_errors
def sweep(obj: Context, task: str, candidates_csv: str, iterations_csv: str,
          preset_name: str, seed: int | None, name: str | None, sets: tuple[str, ...],
          backend: str | None, out_path: Path | None, no_launch: bool, as_json: bool) -> None:
    """Run a grid of candidates-per-iteration x iterations and plot accuracy against
    the total number of candidates (the paper's Figure 4).

    Each cell is one run (both arms for a vision task, unless --set arms=lm), launched
    one after another on this installation. Prints a table per cell: seed accuracy,
    the accuracy of the model each arm selected last, and the run id; writes the PNG.
    """
    grid_n = sweeps.int_list(candidates_csv, "--candidates")
    grid_it = sweeps.int_list(iterations_csv, "--iterations")
    overrides: dict[str, Any] = parse_sets(sets)
    if seed is not None:
        overrides["seed"] = seed
    plan = sweeps.plan(task, grid_n, grid_it, preset_name, overrides, name, no_launch=no_launch)
    settings = obj.settings
    if backend is not None:
        settings = dataclasses.replace(settings, sandbox_backend=backend)

    family = task_family(task)

    def progress(label: str, event: str, info: dict[str, Any]) -> None:
        if event in ("iteration", "done", "failed", "lm_trained"):
            click.echo(f"{label} ", err=True, nl=False)
            print_progress(event, info, family)

    rows = sweeps.run(settings, plan, no_launch=no_launch,
                      say=lambda line: click.echo(line, err=True), progress=progress)
    figure = sweeps.figure(settings, plan, rows, out_path)
    name = plan.name
    if as_json:
        emit_json({"sweep": name, "task": task, "figure": str(figure), "cells": rows})
        return
    click.echo(f"sweep {name} on {task}: {len(rows)} cells")
    from pipeline.proposers import names
    arms = [a for a in names() if a in ("lm", "random") or any(r.get(a) is not None for r in rows)]
    click.echo(table(["candidates", "iterations", "total", "seed acc",
                      *(f"{a} acc" for a in arms), "status", "run"],
                     [[r["candidates"], r["iterations"], r["total"], fmt_score(r["start"]),
                       *(fmt_score(r.get(a)) for a in arms), r["status"], r["run_id"]]
                      for r in sorted(rows, key=lambda r: (r["total"], r["candidates"]))]))
    click.echo(f"\nfigure: {figure}")
