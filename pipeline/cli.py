"""`selfprog-cli`: launch self-programming runs and query the lineage database.

Query commands print a human table by default and JSON with `--json`. Anything the
user got wrong (an unknown run, a bad URL, an unknown preset, an unwritable path) ends
as one `Error: ...` line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from pipeline.settings import ConfigError, Settings, preset as build_preset
from pipeline.store import (CANDIDATE_STATUSES, CandidateView, IterationView, LineageStore,
                            StoreError)
from pipeline.store.models import ARMS

# Short names for the transformer design parameters in tables; other keys print as is.
_SHORT = {"num_layers": "enc", "num_decoder_layers": "dec", "num_heads": "heads"}
_CONFIG_SUMMARY = ("iterations", "candidates", "fewshot_samples", "fewshot_epochs",
                   "dataset_size", "d_model", "lm_epochs", "temperature")


# ------------------------------------------------------------------ plumbing

@dataclasses.dataclass
class Context:
    settings: Settings

    def open_store(self, *, create: bool = False) -> LineageStore:
        """Open the lineage store; query commands refuse to create a new SQLite file,
        so a mistyped path says so instead of showing an empty database."""
        if not create:
            path = _sqlite_path(self.settings.database_url)
            if path is not None and not path.exists():
                raise StoreError(f"no lineage database at {str(path)!r} "
                                 "(launch a run first, or pass --database-url)")
        return LineageStore(self.settings.database_url)


def _sqlite_path(url: str) -> Path | None:
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None       # LineageStore reports the bad URL
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):
        return None
    return Path(parsed.database).expanduser()


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def handle_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause into one `Error:` line and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (StoreError, ConfigError) as exc:
            raise click.ClickException(_first_line(exc)) from None
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{exc.strerror or _first_line(exc)}{where}") from None
        except SQLAlchemyError as exc:
            raise click.ClickException(f"database error: {_first_line(exc)}") from None
    return wrapper


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_score(score: float | None) -> str:
    if score is None:
        return "-"
    return f"{score:.4f}" if abs(score) < 1e4 else f"{score:.4g}"


def fmt_time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def fmt_design(design: dict[str, Any] | None) -> str:
    if not design:
        return "-"
    parts = []
    for key, value in design.items():
        if isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{_SHORT.get(key, key)}={value}")
    return " ".join(parts)


def shorten(text: str, width: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------- run summaries

def lower_is_better(task: str) -> bool:
    # Self-programming scores are few-shot training losses; vision tasks score accuracy.
    return task == "self"


def iteration_rows(iterations: Sequence[IterationView],
                   candidates: Sequence[CandidateView]) -> list[dict[str, Any]]:
    """One summary per iteration: the selected source, its score, the incumbent's, the fate."""
    by_id = {c.id: c for c in candidates}
    rows = []
    for it in iterations:
        selected = by_id.get(it.selected_id)
        incumbent = by_id.get(it.incumbent_id)
        generated = [c for c in candidates if c.arm == it.arm and c.iteration == it.index
                     and c.role == "candidate"]
        rows.append({
            "index": it.index,
            "arm": it.arm,
            "stage": it.stage,
            "selected_id": it.selected_id,
            "design": selected.design if selected else None,
            "score": selected.score if selected else None,
            "incumbent_id": it.incumbent_id,
            "incumbent_score": incumbent.score if incumbent else None,
            "decision": it.decision,
            "evaluated": sum(c.status == "evaluated" for c in generated),
            "total": len(generated),
        })
    return rows


def iteration_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["it", "arm", "stage", "selected design", "score", "incumbent", "decision", "evaluated"],
        [[r["index"], r["arm"], r["stage"], fmt_design(r["design"]), fmt_score(r["score"]),
          fmt_score(r["incumbent_score"]), r["decision"] or "-",
          f"{r['evaluated']}/{r['total']}"] for r in rows])


def run_summary(store: LineageStore, run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    iterations = store.iterations(run.id)
    done = [it for it in iterations if it.arm == "lm" and it.stage == "done"]
    selected_ids = {it.selected_id for it in iterations if it.arm == "lm" and it.selected_id}
    scores = [c.score for c in store.candidates(run.id, arm="lm")
              if c.id in selected_ids and c.score is not None]
    best = None
    if scores:
        best = min(scores) if lower_is_better(run.task) else max(scores)
    return {**dataclasses.asdict(run), "iterations_done": len(done), "best_score": best}


def arm_outcomes(iterations: Sequence[IterationView],
                 candidates: Sequence[CandidateView]) -> dict[str, dict[str, Any]]:
    """Per arm: the seed's score (iteration 0's incumbent), the score of the source the
    last finished iteration selected, and how many iterations finished."""
    by_id = {c.id: c for c in candidates}
    out: dict[str, dict[str, Any]] = {}
    for arm in sorted({it.arm for it in iterations}, key=lambda a: (a != "lm", a)):
        rows = sorted((it for it in iterations if it.arm == arm), key=lambda it: it.index)
        done = [it for it in rows if it.stage == "done"]
        seed = by_id.get(rows[0].incumbent_id) if rows else None
        end = by_id.get(done[-1].selected_id) if done else None
        out[arm] = {"start": seed.score if seed else None, "end": end.score if end else None,
                    "iterations_done": len(done),
                    "end_params": end.param_count if end else None,
                    "end_design": end.design if end else None}
    return out


def arms_line(outcomes: dict[str, dict[str, Any]]) -> str:
    return "   ".join(f"{arm}: {fmt_score(o['start'])} -> {fmt_score(o['end'])} "
                      f"({o['iterations_done']} it.)" for arm, o in outcomes.items())


# ------------------------------------------------------------------ commands

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--database-url", envvar="SELFPROG_DATABASE_URL", metavar="URL",
              help="Lineage database (SQLAlchemy URL), e.g. sqlite:///selfprog.db or "
                   "postgresql+psycopg2://user@host/db. Default: $SELFPROG_DATABASE_URL, "
                   "else selfprog.db in the working directory.")
@click.option("--artifact-dir", metavar="DIR",
              help="Where runs keep tokenizers, weights and plots. "
                   "Default: $SELFPROG_ARTIFACT_DIR, else ./selfprog-artifacts.")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, artifact_dir: str | None) -> None:
    """Self-programming AI: launch runs and inspect every candidate they produced.

    A run trains a code-generating T5 model, lets it rewrite its own source, evaluates
    each rewrite in a sandbox and keeps the best. Every candidate is stored with its
    parent, score and fate; the query commands below read that lineage.
    """
    try:
        settings = Settings.from_env(database_url=database_url, artifact_dir=artifact_dir)
    except ConfigError as exc:
        raise click.ClickException(_first_line(exc)) from None
    ctx.obj = Context(settings)


pass_ctx = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print machine-readable JSON on stdout instead of a table.")


@main.command()
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


@main.command()
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
        run = store.get_run(run_id)
        its, cands = store.iterations(run.id), store.candidates(run.id)
        rows = iteration_rows(its, cands)
        outcomes = arm_outcomes(its, cands)
    if as_json:
        emit_json({**dataclasses.asdict(run), "iterations": rows, "arms": outcomes})
        return
    click.echo(f"run {run.id}  task={run.task}  preset={run.preset}  seed={run.seed}  "
               f"status={run.status}")
    click.echo(f"created {fmt_time(run.created_at)} UTC   finished {fmt_time(run.finished_at)}")
    summary = " ".join(f"{k}={run.config[k]}" for k in _CONFIG_SUMMARY if k in run.config)
    if summary:
        click.echo(f"config: {summary}   (--json for all of it)")
    if run.error:
        click.echo(f"error: {shorten(run.error, 200)}")
    click.echo("")
    click.echo(iteration_table(rows) if rows else "no iterations yet")
    if len({r["arm"] for r in rows}) > 1:
        click.echo("")
        click.echo("arms, seed score -> selected score: " + arms_line(outcomes))


@main.command()
@click.argument("run_id", metavar="RUN")
@click.option("--status", type=click.Choice(CANDIDATE_STATUSES),
              help="Only candidates in this state.")
@click.option("--iteration", type=int, help="Only candidates of this iteration.")
@click.option("--arm", type=click.Choice(ARMS),
              help="Only this arm: 'lm' (written by the LM) or 'random' (the baseline).")
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
    if as_json:
        emit_json([dataclasses.asdict(c) for c in rows])
        return
    if not rows:
        click.echo("no candidates match")
        return
    click.echo(table(
        ["id", "arm", "it", "idx", "role", "status", "score", "params", "reason"],
        [[c.id, c.arm, c.iteration, c.index, c.role, c.status, fmt_score(c.score),
          "-" if c.param_count is None else f"{c.param_count:,}", shorten(c.reason)]
         for c in rows]))


@main.command()
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
        chain = store.lineage(candidate_id)
    steps = []
    previous: CandidateView | None = None
    for c in chain:
        diff = ""
        if previous is not None and previous.source != c.source:
            diff = "".join(difflib.unified_diff(
                previous.source.splitlines(keepends=True), c.source.splitlines(keepends=True),
                fromfile=f"candidate {previous.id}", tofile=f"candidate {c.id}"))
        steps.append((c, diff))
        previous = c
    if as_json:
        emit_json([{"id": c.id, "run_id": c.run_id, "iteration": c.iteration, "index": c.index,
                    "arm": c.arm, "role": c.role, "parent_id": c.parent_id, "status": c.status,
                    "score": c.score, "design": c.design, "sha256": c.sha256, "diff": diff}
                   for c, diff in steps])
        return
    click.echo(f"lineage of candidate {candidate_id}: {len(steps)} step(s), seed first")
    for number, (c, diff) in enumerate(steps, 1):
        click.echo("")
        click.echo(f"[{number}] candidate {c.id}  run {c.run_id}  iteration {c.iteration}  "
                   f"index {c.index} ({c.role}, {c.arm})  {c.status}  score {fmt_score(c.score)}")
        click.echo(f"    design: {fmt_design(c.design)}")
        if diff:
            click.echo(diff.rstrip("\n"))


@main.command()
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
    iteration.

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
        if not lower_is_better(run.task):
            paths += plots.plot_vision_run(run, its, cands, curves, out)
    except OSError as exc:
        raise click.ClickException(
            f"cannot write plots to {str(out)!r}: {exc.strerror or _first_line(exc)}") from None
    if as_json:
        emit_json({"run_id": run.id, "files": [str(p) for p in paths]})
    else:
        for p in paths:
            click.echo(str(p))


def parse_sets(values: Sequence[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = value.strip()
    return overrides


def print_progress(event: str, info: dict[str, Any]) -> None:
    """One concise line per loop event, on stderr (stdout stays for results)."""
    it = info.get("iteration")
    arm = f" {info['arm']}" if info.get("arm") not in (None, "lm") else ""
    where = f"[iteration {it}{arm}]" if it is not None else "[run]"
    if event == "stage":
        line = f"{where} {info.get('stage', '?')}"
    elif event == "candidate":
        line = f"{where} candidate {info.get('index', '?')}: {info.get('status', '?')}"
        if info.get("score") is not None:
            line += f"  score {fmt_score(info['score'])}"
    elif event == "lm_step":
        line = f"{where} LM step {info.get('step', '?')}: loss {fmt_score(info.get('loss'))}"
    elif event == "iteration":
        line = (f"{where} {info.get('decision') or 'done'}: score {fmt_score(info.get('score'))}"
                f"  {fmt_design(info.get('design'))}")
    else:
        details = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in info.items() if k != "iteration")
        line = f"{where} {event} {details}".rstrip()
    click.echo(line, err=True)


@main.command()
@click.option("--preset", "preset_name", default="quick", show_default=True,
              help="Starting configuration: 'quick' (tiny sizes, minutes on a CPU) or "
                   "'paper' (the paper's section 4.1 setting).")
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
@click.option("--backend", type=click.Choice(["auto", "docker", "process"]),
              help="Sandbox backend for generated code (default: $SELFPROG_SANDBOX_BACKEND, "
                   "else auto: Docker when available, else local processes). Embedded "
                   "runs only: workers use their own setting.")
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

    from pipeline.loop import launch as launch_run   # heavy (torch); only this command

    run_id = launch_run(settings, config, progress=None if detach else print_progress,
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
        raise click.ClickException(f"broker {_hide_password(settings.broker_url)} does not "
                                   f"answer: {_first_line(exc)}") from None


def _hide_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


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
    click.echo(iteration_table(rows) if rows else "no iterations")
    click.echo(f"\nnext: selfprog-cli show {run.id} | selfprog-cli plot {run.id}")
    if run.status == "failed":
        raise click.ClickException(f"run {run.id} failed: {shorten(run.error or '', 300)}")


def _needs_broker(settings: Settings, what: str) -> None:
    if settings.embedded:
        raise click.ClickException(f"{what} follows runs on the workers: set "
                                   "SELFPROG_BROKER_URL (embedded runs report progress in "
                                   "the process that launched them; see `show RUN`)")


@main.command()
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
    if not as_json:
        click.echo(f"run {run.id}: {run.status}", err=True)
        if rows:
            click.echo(iteration_table(rows), err=True)

    def show_event(event: str, info: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps({"event": event, **info}, default=str))
        else:
            print_progress(event, info)

    status = run.status
    if status not in ("completed", "failed", "cancelled"):
        from pipeline.loop import attach   # heavy (torch)
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


@main.command()
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
    from pipeline.loop import cancel as cancel_run   # heavy (torch)

    n = cancel_run(obj.settings, run.id)
    if as_json:
        emit_json({"run_id": run.id, "status": "cancelled", "candidates_cancelled": n})
    else:
        click.echo(f"run {run.id}: cancelled ({n} unfinished candidate(s) cancelled)")


@main.command()
@click.argument("run_id", metavar="RUN")
@click.option("--detach", is_flag=True,
              help="With a broker: hand the run back to the coordinator and return at once.")
@json_option
@pass_ctx
@handle_errors
def resume(obj: Context, run_id: str, detach: bool, as_json: bool) -> None:
    """Carry on an interrupted run from what the lineage database records.

    For a run stopped by a crash, a lost broker (Redis restarted without its data) or a
    stage failure: every unfinished iteration restarts at its recorded stage, and
    candidates already in a final state are not run again. Safe on a run that is still
    moving (nothing is recorded twice). A completed run is left alone; a cancelled one
    is not resumed. Then waits like `launch` (or returns at once with --detach).
    """
    settings = obj.settings
    if detach and settings.embedded:
        raise click.ClickException("--detach needs a broker: set SELFPROG_BROKER_URL")
    with obj.open_store() as store:
        run = store.get_run(run_id)
    _check_broker(settings)
    from pipeline.loop import resume as resume_run   # heavy (torch)

    resume_run(settings, run.id, progress=None if detach else print_progress, detach=detach)
    if detach:
        _report_submitted(run.id, as_json)
        return
    _report_run(settings, run.id, as_json)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{what} expects positive integers, got {text!r}")
    return sorted(set(values))


def sweep_cells(store: LineageStore, name: str) -> dict[tuple[int, int], Any]:
    """The newest run of each (candidates, iterations) cell of a sweep."""
    cells: dict[tuple[int, int], Any] = {}
    for run in store.list_runs(100_000):          # newest first
        cfg = run.config or {}
        if cfg.get("sweep") == name:
            cells.setdefault((int(cfg["candidates"]), int(cfg["iterations"])), run)
    return cells


@main.command()
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
@click.option("--backend", type=click.Choice(["auto", "docker", "process"]),
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
    if task == "self":
        raise ConfigError("sweep is for vision tasks (it plots accuracy); pick --task")
    grid_n = _int_list(candidates_csv, "--candidates")
    grid_it = _int_list(iterations_csv, "--iterations")
    overrides: dict[str, Any] = parse_sets(sets)
    if seed is not None:
        overrides["seed"] = seed
    if name is None:
        if no_launch:
            raise ConfigError("--no-launch needs the --name of an existing sweep")
        import uuid
        name = f"{task}-{uuid.uuid4().hex[:8]}"
    configs = {(n, it): build_preset(preset_name, **{**overrides, "task": task, "candidates": n,
                                                     "iterations": it, "sweep": name})
               for n in grid_n for it in grid_it}   # every cell's config checked up front
    settings = obj.settings
    if backend is not None:
        settings = dataclasses.replace(settings, sandbox_backend=backend)
    obj.open_store(create=True).close()

    from pipeline import plots
    from pipeline.loop import launch as launch_run

    with LineageStore(settings.database_url) as store:
        done = {k: r for k, r in sweep_cells(store, name).items() if r.status == "completed"}
    for number, (key, config) in enumerate(configs.items(), 1):
        label = f"[sweep {name} {number}/{len(configs)}] candidates={key[0]} iterations={key[1]}"
        if key in done:
            click.echo(f"{label}: reusing completed run {done[key].id}", err=True)
            continue
        if no_launch:
            continue
        click.echo(f"{label}: launching", err=True)

        def progress(event: str, info: dict[str, Any], label: str = label) -> None:
            if event in ("iteration", "done", "failed", "lm_trained"):
                click.echo(f"{label} ", err=True, nl=False)
                print_progress(event, info)

        launch_run(settings, config, progress=progress)

    rows = []
    with LineageStore(settings.database_url) as store:
        cells = sweep_cells(store, name)
        for key in configs:
            run = cells.get(key)
            o = arm_outcomes(store.iterations(run.id), store.candidates(run.id)) if run else {}
            rows.append({"candidates": key[0], "iterations": key[1], "total": key[0] * key[1],
                         "run_id": run.id if run else None,
                         "status": run.status if run else "missing",
                         "start": (o.get("lm") or o.get("random") or {}).get("start"),
                         "lm": o.get("lm", {}).get("end"), "random": o.get("random", {}).get("end")})
    out = out_path if out_path is not None else settings.artifacts / "sweeps" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = plots.plot_sweep(task, [r for r in rows if r["status"] == "completed"], out)
    if as_json:
        emit_json({"sweep": name, "task": task, "figure": str(figure), "cells": rows})
        return
    click.echo(f"sweep {name} on {task}: {len(rows)} cells")
    click.echo(table(["candidates", "iterations", "total", "seed acc", "lm acc", "random acc",
                      "status", "run"],
                     [[r["candidates"], r["iterations"], r["total"], fmt_score(r["start"]),
                       fmt_score(r["lm"]), fmt_score(r["random"]), r["status"], r["run_id"]]
                      for r in sorted(rows, key=lambda r: (r["total"], r["candidates"]))]))
    click.echo(f"\nfigure: {figure}")


# ------------------------------------------------------------------ doctor (issue 5)

@main.command()
@click.option("--skip-canary", is_flag=True,
              help="Do not run the confinement canary (it starts two small sandboxes).")
@json_option
@pass_ctx
@handle_errors
def doctor(obj: Context, skip_canary: bool, as_json: bool) -> None:
    """Check this installation and say how to fix what is missing.

    Reports the Docker engine, the sandbox image, Redis, the lineage database, GPUs, the
    sandbox backend the settings pick ('auto': Docker when it is usable, else the
    weaker process backend) and the confinement canary (network denied, a planted host
    file unreadable, the memory limit enforced). Each line is ok, warn or fail; exits 1
    only when something the configured setup needs fails.
    """
    from pipeline import doctor as doc   # torch and docker are slow to import

    checks = doc.run_checks(obj.settings, canary=not skip_canary)
    code = doc.exit_code(checks)
    if as_json:
        emit_json({"ok": code == 0, "checks": [c.to_dict() for c in checks]})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{c.status.upper():4}  {c.name.ljust(width)}  {c.detail}")
            if c.fix and c.status != "ok":
                click.echo(f"{'':4}  {'':{width}}  fix: {c.fix}")
    if code:
        raise click.exceptions.Exit(code)


if __name__ == "__main__":   # python -m pipeline.cli
    sys.exit(main())
