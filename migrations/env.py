"""Alembic environment for the lineage database.

Where the database is, in order of precedence:
1. a connection a program hands over in `config.attributes["connection"]`
   (LineageStore does this, so in-memory SQLite and its engine settings work);
2. `sqlalchemy.url` set on the config by a program;
3. the SELFPROG_DATABASE_URL environment variable;
4. the default of pipeline.settings.Settings (a SQLite file in the working directory).
"""
from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import func, select

from pipeline.settings import Settings
from pipeline.store.schema import make_engine
from pipeline.store.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata

# Any fixed number: PostgreSQL advisory lock key that serializes concurrent upgrades
# (coordinator and workers may all start at once against the same database).
_MIGRATION_LOCK_KEY = 0x5E1F9806


def database_url() -> str:
    return (config.get_main_option("sqlalchemy.url")
            or os.environ.get("SELFPROG_DATABASE_URL")
            or Settings().database_url)


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # As in pipeline/store/schema.py (upgrade_schema): a batch rebuild's DROP
                # TABLE must not fire the ON DELETE actions of referring tables.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            _run(connection)
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration left {len(broken)} broken reference(s)")
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
