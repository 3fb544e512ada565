"""Engines and the schema of the lineage database: opening a URL, the Alembic migrations
(in the top-level migrations/, installed as pipeline/store/migrations/), and whether a database is at
the newest revision.

Query paths never migrate (`schema_is_current`, `SchemaOutOfDate`); only
`LineageStore(url, create=True)` (launch, the coordinator) and `selfprog-cli db upgrade`
do (`upgrade_schema`).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import sqlite3
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from pipeline.store.errors import SchemaOutOfDate, StoreError
from pipeline.text import first_line, sqlite_path

def _migrations_dir() -> Path:
    # One copy: the repository's top-level migrations/, which pyproject.toml installs as
    # pipeline/store/migrations/ in a wheel. A checkout (or an editable install) has only
    # the first, an installed package only the second.
    here = Path(__file__).resolve().parent
    installed = here / "migrations"
    return installed if installed.is_dir() else here.parents[1] / "migrations"


MIGRATIONS_DIR = _migrations_dir()


def alembic_config():
    """An Alembic Config for the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revisions() -> tuple[str, ...]:
    """The newest revision(s) of the migrations shipped with this code."""
    from alembic.script import ScriptDirectory
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(engine: Engine) -> tuple[str, ...]:
    """The revision(s) the database is at; () for a database without the schema."""
    from alembic.runtime.migration import MigrationContext
    with engine.connect() as connection:
        return tuple(MigrationContext.configure(connection).get_current_heads())


def schema_is_current(engine: Engine) -> bool:
    return set(current_revisions(engine)) == set(head_revisions())


def require_current(engine: Engine, shown: str) -> None:
    """Raise SchemaOutOfDate unless the database is at the newest revision."""
    current, head = current_revisions(engine), head_revisions()
    if set(current) == set(head):
        return
    at = ", ".join(current) if current else "no lineage schema"
    raise SchemaOutOfDate(f"the lineage database {shown} is not at the current schema (it has "
                          f"{at}; this selfprog needs {', '.join(head)}): run "
                          "`selfprog-cli db upgrade`")


def make_engine(url: str, *, create_file: bool = True, read_only: bool = False) -> Engine:
    """An engine for a lineage database URL; errors become a one-line StoreError.

    A new SQLite file is created owner-only (0600) before SQLite touches it: sandboxes
    run as another uid and must not be able to read the lineage (or anything in it).
    Without `create_file` a missing SQLite file is an error instead (query paths).

    `read_only` (the web view): the database itself refuses writes, whatever the code
    above it does: SQLite opens the file with `mode=ro`, PostgreSQL sessions start with
    `default_transaction_read_only`.
    """
    if read_only and create_file:
        raise ValueError("a read-only engine cannot create its database")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"bad database URL {url!r} (expected e.g. sqlite:///selfprog.db "
                         "or postgresql+psycopg2://user@host/db)") from None
    if parsed.drivername == "postgresql" and not _importable("psycopg"):
        # SQLAlchemy 2.1 picks psycopg (3) for a bare postgresql:// URL; this project
        # ships psycopg2, so let the common short form work.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    shown = parsed.render_as_string(hide_password=True)
    kwargs: dict[str, Any] = {}
    path = sqlite_path(parsed)
    if not create_file and path is not None and not path.exists():
        raise SchemaOutOfDate(f"no lineage database at {str(path)!r} (launch a run first, "
                              "run `selfprog-cli db upgrade`, or pass --database-url)")
    if parsed.get_backend_name() == "sqlite":
        # Threads of the embedded default share the engine; wait on a locked file
        # instead of failing at once.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if path is None:
            if read_only:
                raise StoreError(f"a read-only view needs an SQLite file, not {shown!r}")
            kwargs["poolclass"] = StaticPool   # one in-memory database, not one per connection
        elif read_only:
            # The URL's own path, opened by SQLite as a read-only URI (mode=ro): the
            # connection cannot write, and cannot create a missing file.
            uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
            kwargs["creator"] = lambda: sqlite3.connect(uri, uri=True, timeout=30,
                                                        check_same_thread=False)
    if path is not None and create_file:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot create SQLite database {str(path)!r}: "
                             f"{exc.strerror or exc}") from None
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise StoreError(f"unsupported database URL {shown!r}: {first_line(exc)}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_foreign_keys)
    elif read_only:
        event.listen(engine, "connect", _read_only_session)
    return engine


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    # SQLite ignores foreign keys unless asked, per connection; PostgreSQL always
    # enforces them. Ask, so both backends accept and refuse the same writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _read_only_session(dbapi_connection: Any, _record: Any) -> None:
    # Every transaction of this connection is READ ONLY: PostgreSQL itself refuses an
    # INSERT, UPDATE, DELETE or DDL (SQLSTATE 25006). A setting of the session, so it
    # holds for whatever SQL is sent, and survives SQLAlchemy's rollbacks.
    cursor = dbapi_connection.cursor()
    cursor.execute("SET default_transaction_read_only = on")
    cursor.close()
    dbapi_connection.commit()


_MIGRATION_THREAD_LOCK = threading.Lock()


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """`alembic upgrade head` (or to `revision`) on this engine's database."""
    from alembic import command

    cfg = alembic_config()
    # Several stores may start at once (threads of the embedded default, worker
    # processes). PostgreSQL serializes them with an advisory lock in
    # migrations/env.py;
    # SQLite runs each DDL statement on its own, so hold an exclusive flock on the
    # database file meanwhile (flock is independent of SQLite's own fcntl locks).
    # Within one process, Alembic's `context`/`op` proxies are module globals, so
    # migrations must also never run in two threads at once.
    path = sqlite_path(engine.url)
    with _MIGRATION_THREAD_LOCK, \
            open(path, "rb") if path is not None else contextlib.nullcontext() as lock_file:
        if lock_file is not None:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # A batch migration rebuilds a table (copy, DROP, rename); with foreign
                # keys on, SQLite's DROP would run the ON DELETE actions of the tables
                # that refer to it (cascading deletes). Off while migrating (outside a
                # transaction, or the pragma does nothing); references checked after.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            try:
                with connection.begin():
                    cfg.attributes["connection"] = connection
                    command.upgrade(cfg, revision)
                    if sqlite:
                        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise StoreError(f"the migration left {len(broken)} broken "
                                             f"reference(s), e.g. {tuple(broken[0])}")
            finally:
                if sqlite:
                    connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                    connection.commit()
