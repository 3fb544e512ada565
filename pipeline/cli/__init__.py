"""`selfprog-cli`: launch self-programming runs and query the lineage database.

Query commands print a human table by default and JSON with `--json`. Anything the
user got wrong (an unknown run, a bad URL, an unknown preset, an unwritable path) ends
as one `Error: ...` line on stderr and a non-zero exit, never a traceback.

The commands: cli/query.py (runs, show, candidates, lineage, plot), cli/run.py (launch,
watch, cancel, resume, sweep), cli/admin.py (doctor, db), cli/evaluate.py (evaluate),
cli/serve.py (serve: the web view);
plumbing in cli/output.py.
"""
from __future__ import annotations

import click

from pipeline.cli import admin, evaluate, query, run, serve
from pipeline.cli.output import Context, print_progress
from pipeline.settings import ConfigError, Settings
from pipeline.text import first_line

__all__ = ["main", "print_progress"]


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
        raise click.ClickException(first_line(exc)) from None
    ctx.obj = Context(settings)


for _command in (query.runs, query.show, query.candidates, query.lineage, query.plot,
                 run.launch, run.watch, run.cancel, run.resume, run.sweep,
                 admin.doctor, admin.db, evaluate.evaluate, serve.serve):
    main.add_command(_command)
