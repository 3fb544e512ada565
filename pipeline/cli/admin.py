"""Administration commands: doctor, and the lineage database's schema (db upgrade,
db current)."""
from __future__ import annotations

import click

from pipeline.cli.output import Context, emit_json, handle_errors, json_option, pass_ctx


@click.command()
@click.option("--skip-canary", is_flag=True,
              help="Do not run the confinement canary (it starts two small sandboxes).")
@json_option
@pass_ctx
@handle_errors
def doctor(obj: Context, skip_canary: bool, as_json: bool) -> None:
    """Check this installation and say how to fix what is missing.

    Reports the Docker engine, the sandbox image, Redis, a live worker on each queue (with
    a broker), the lineage database, GPUs, the
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


@click.group()
def db() -> None:
    """The lineage database's schema: see where it stands, bring it up to date.

    Query commands never change the database; when its schema is older than this
    selfprog they say so, and `db upgrade` migrates it (`launch` and the coordinator
    create or upgrade it by themselves).
    """


@db.command()
@json_option
@pass_ctx
@handle_errors
def upgrade(obj: Context, as_json: bool) -> None:
    """Create the lineage database, or migrate it to this selfprog's newest schema.

    Uses --database-url / $SELFPROG_DATABASE_URL. Safe to run again: a database that is
    up to date is left as it is. Several processes may run it at once.
    """
    from pipeline.store import current_revisions, head_revisions, make_engine, upgrade_schema
    from pipeline.text import hide_password

    url = obj.settings.database_url
    engine = make_engine(url)
    try:
        before = current_revisions(engine)
        upgrade_schema(engine)
        after = current_revisions(engine)
    finally:
        engine.dispose()
    changed = set(before) != set(after)
    if as_json:
        emit_json({"database": hide_password(url), "from": list(before), "to": list(after),
                   "head": list(head_revisions()), "upgraded": changed})
        return
    if changed:
        click.echo(f"{hide_password(url)}: upgraded from "
                   f"{', '.join(before) or 'an empty database'} to {', '.join(after)}")
    else:
        click.echo(f"{hide_password(url)}: already at {', '.join(after)} (nothing to do)")


@db.command()
@json_option
@pass_ctx
@handle_errors
def current(obj: Context, as_json: bool) -> None:
    """Show the lineage database's schema revision and whether it is the newest.

    Changes nothing. Exits 1 when the database needs `selfprog-cli db upgrade`.
    """
    from pipeline.store import current_revisions, head_revisions, make_engine
    from pipeline.text import hide_password

    url = obj.settings.database_url
    engine = make_engine(url, create_file=False)
    try:
        now = current_revisions(engine)
    finally:
        engine.dispose()
    head = head_revisions()
    ok = set(now) == set(head)
    if as_json:
        emit_json({"database": hide_password(url), "current": list(now), "head": list(head),
                   "up_to_date": ok})
    else:
        click.echo(f"{hide_password(url)}: {', '.join(now) or 'no lineage schema'}"
                   + (" (up to date)" if ok else f" (newest is {', '.join(head)}: run "
                                                 "`selfprog-cli db upgrade`)"))
    if not ok:
        raise click.exceptions.Exit(1)
