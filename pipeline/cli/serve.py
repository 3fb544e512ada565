"""`serve`: the read-only web view of the lineage database (pipeline/web/)."""
from __future__ import annotations

import logging

import click

from pipeline.cli.output import Context, handle_errors, pass_ctx
from pipeline.settings import ConfigError


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. Anything but the loopback interface needs a "
                   "token: $SELFPROG_WEB_TOKEN.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="TCP port to listen on.")
@pass_ctx
@handle_errors
def serve(obj: Context, host: str, port: int) -> None:
    """Serve a read-only web view of the lineage: runs, each run's iterations, curves and
    candidate tree, every candidate's source, diff and logs, run comparisons, and their
    JSON under /api (the keys of --json). A running run's page follows it live (with a
    broker, on its events too, as `watch` does).

    The database is opened read-only (SQLite mode=ro, PostgreSQL read-only sessions).
    With $SELFPROG_WEB_TOKEN set, every request needs it (the browser asks once; scripts
    send `Authorization: Bearer TOKEN`); it is required when --host is not loopback.
    """
    import uvicorn

    from pipeline.store import LineageStore
    from pipeline.web.app import create_app, is_loopback

    token = obj.settings.web_token
    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host} is reachable from other machines: set "
                          "SELFPROG_WEB_TOKEN to the token the view must ask for")
    store = LineageStore(obj.settings.database_url, read_only=True)
    access = logging.getLogger("selfprog.web")
    if not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    click.echo(f"serving the lineage read-only on http://{host}:{port}/"
               + (" (token required)" if token else ""), err=True)
    try:
        # uvicorn's own access log would print query strings: ours (pipeline/web/app.py)
        # prints method, path and status only
        app = create_app(store, token=token, host=host, broker_url=obj.settings.broker_url)
        uvicorn.run(app, host=host, port=port,
                    access_log=False, server_header=False, log_level="warning")
    finally:
        store.close()
