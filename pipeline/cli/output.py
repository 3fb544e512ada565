"""The CLI's plumbing: the per-invocation context, one-line errors, JSON and tables."""
from __future__ import annotations

import dataclasses
import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import click
from sqlalchemy.exc import SQLAlchemyError

from pipeline.report import fmt_design, fmt_score, fmt_share, fmt_steps, task_family
from pipeline.settings import ConfigError, Settings
from pipeline.store import LineageStore, StoreError
from pipeline.text import first_line


@dataclasses.dataclass
class Context:
    settings: Settings

    def open_store(self, *, create: bool = False) -> LineageStore:
        """Open the lineage store. Queries (the default) never create or migrate: a
        mistyped SQLite path or an old schema says so instead of showing nothing."""
        return LineageStore(self.settings.database_url, create=create)


pass_ctx = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print machine-readable JSON on stdout instead of a table.")


def handle_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause into one `Error:` line and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (StoreError, ConfigError) as exc:
            raise click.ClickException(first_line(exc)) from None
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{exc.strerror or first_line(exc)}{where}") from None
        except SQLAlchemyError as exc:
            raise click.ClickException(f"database error: {first_line(exc)}") from None
    return wrapper


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=json_default))


def json_default(value: Any) -> Any:
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


def iteration_table(rows: list[dict[str, Any]], family: Any | None = None) -> str:
    """`rows` (report.iteration_rows) as a table; designs as `family` names them."""
    return table(
        ["it", "arm", "stage", "selected design", "score", "incumbent", "decision", "evaluated",
         "LM steps", "p_intact", "1-edit", "tuned", "repeats"],
        [[r["index"], r["arm"], r["stage"], fmt_design(r["design"], family), fmt_score(r["score"]),
          fmt_score(r["incumbent_score"]), r["decision"] or "-",
          f"{r['evaluated']}/{r['total']}", fmt_steps(r), fmt_share(r["lm_p_intact"]),
          fmt_share(r["single_edit_rate"]), _tuned(r), fmt_share(r["repeat_rate"])] for r in rows])


def _tuned(row: dict[str, Any]) -> str:
    """The lineage arm's fine-tuning: steps on how many pairs, and its last loss."""
    if not row["finetune_steps"]:
        return "-"
    return f"{row['finetune_steps']}x{row['finetune_pairs']} {fmt_score(row['finetune_loss'])}"


def progress_for(task: str) -> Callable[[str, dict[str, Any]], None]:
    """`print_progress` for a run of `task`: its designs as the task's family names them."""
    return functools.partial(print_progress, family=task_family(task))


def print_progress(event: str, info: dict[str, Any], family: Any | None = None) -> None:
    """One concise line per loop event, on stderr (stdout stays for results); designs
    as `family` (the run's, report.task_family) names them."""
    it = info.get("iteration")
    arm = f" {info['arm']}" if info.get("arm") not in (None, "lm") else ""
    where = f"[iteration {it}{arm}]" if it is not None else "[run]"
    if event == "stage":
        line = f"{where} {info.get('stage', '?')}"
    elif event == "candidate":
        line = f"{where} candidate {info.get('index', '?')}: {info.get('status', '?')}"
        if info.get("score") is not None:
            line += f"  score {fmt_score(info['score'])}"
        if info.get("reused"):
            line += "  (reused: evaluated before, no sandbox)"
    elif event == "lm_step":
        line = f"{where} LM step {info.get('step', '?')}: loss {fmt_score(info.get('loss'))}"
    elif event == "lm_trained":
        line = f"{where} LM trained: {info.get('steps', '?')} steps, loss {fmt_score(info.get('final_loss'))}"
        if info.get("p_intact") is not None:
            line += (f", copies its input: p_intact {info['p_intact']:.2f}, copy accuracy "
                     f"{info.get('copy_accuracy', 0):.3f} (stopped: {info.get('stop')})")
    elif event == "generated":
        rate = info.get("single_edit_rate")
        line = (f"{where} {info.get('samples', '?')} samples, "
                f"{'-' if rate is None else f'{100 * rate:.0f}%'} change exactly one parameter")
        if info.get("finetune_steps"):
            line += f" (after {info['finetune_steps']} fine-tuning steps on the lineage)"
    elif event == "iteration":
        line = (f"{where} {info.get('decision') or 'done'}: score {fmt_score(info.get('score'))}"
                f"  {fmt_design(info.get('design'), family)}")
    else:
        details = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in info.items() if k != "iteration")
        line = f"{where} {event} {details}".rstrip()
    click.echo(line, err=True)
