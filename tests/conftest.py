"""Shared fixtures.

`database_url` runs a test against both real backends of the lineage store: a fresh
SQLite file, and the PostgreSQL server (SELFPROG_TEST_POSTGRES_URL, default the local
one). Each PostgreSQL test gets its own schema, selected through the connection's
search_path, so tests (and other people's test runs on the same database) never see
each other's tables; the schema is dropped afterwards.

PostgreSQL missing: the postgres case is skipped on a developer machine, but fails when
the CI environment variable is set, so CI can never go green without it (`make test`
starts the server and creates the `test` database: scripts/services.sh). Root-only tests
carry `@pytest.mark.root(...)`: skipped without root, failed under CI.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.schema import CreateSchema, DropSchema

from tests.support.env import require_root

def pytest_runtest_setup(item):
    """`@pytest.mark.root`: needs root; skips without it, fails in CI (tests/support/env.py)."""
    marker = item.get_closest_marker("root")
    if marker is not None:
        require_root(marker.args[0] if marker.args else "this test")


POSTGRES_URL = os.environ.get("SELFPROG_TEST_POSTGRES_URL",
                              "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def _postgres_unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI but unreachable: {reason}")
    pytest.skip(f"PostgreSQL unreachable: {reason}")


@pytest.fixture
def postgres_url():
    """A URL to an empty, private schema on the test PostgreSQL server."""
    admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
    schema = "selfprog_test_" + uuid.uuid4().hex[:12]
    try:
        with admin.begin() as conn:
            conn.execute(CreateSchema(schema))
    except OperationalError as exc:
        admin.dispose()
        _postgres_unavailable(str(exc.orig).strip().splitlines()[0])
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(DropSchema(schema, cascade=True, if_exists=True))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'lineage.db'}"


@pytest.fixture(params=[
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
])
def database_url(request):
    """A URL to an empty lineage database, once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return request.getfixturevalue(name)


@pytest.fixture
def store(database_url):
    """A migrated LineageStore on `database_url`, closed after the test."""
    from pipeline.store import LineageStore

    s = LineageStore(database_url, create=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A tiny T5 training set (input_ids, attention_mask, labels) for sandbox jobs."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    n, s, t = 16, 12, 8
    labels = torch.randint(2, 60, (n, t), generator=g)
    labels[:, 6:] = -100
    path = tmp_path_factory.mktemp("data") / "data.safetensors"
    save_file({"input_ids": torch.randint(2, 60, (n, s), generator=g),
               "attention_mask": torch.ones(n, s, dtype=torch.int64),
               "labels": labels}, str(path))
    return path


@pytest.fixture(scope="module")
def process_backend():
    """A confined ProcessBackend (root: per-job uid, network namespace), probed."""
    require_root("the confined process backend")
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, the sandbox uid could not
    # traverse it.
    workroot = Path(tempfile.mkdtemp(prefix="selfprog-sandbox-test-"))
    os.chmod(workroot, 0o711)
    from sandbox.backends.process import ProcessBackend
    b = ProcessBackend(workroot=workroot / "jobs")
    b.probe()
    yield b
    shutil.rmtree(workroot, ignore_errors=True)


REDIS_URL = os.environ.get("SELFPROG_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_url():
    """The test Redis database, empty before and after (one DB number for these tests)."""
    import redis
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required in CI but unreachable: {exc}")
        pytest.skip(f"Redis unreachable: {exc}")
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def restore_embedded():
    """Tests here point the in-process Celery app at a broker; put it back after."""
    yield
    from pipeline import celery_app
    from pipeline.settings import Settings
    celery_app.configure(Settings.from_env(env={}))


@pytest.fixture(scope="module")
def client():
    """A Docker engine client; skips (fails under SELFPROG_REQUIRE_DOCKER=1) without the
    engine or the sandbox image. Reaps this test run's containers afterwards."""
    import docker

    from sandbox.backends.docker import docker_available, reap_orphans
    from tests.support.docker import IMAGE, OWNER

    ok, why = docker_available(IMAGE)
    if not ok:
        if os.environ.get("SELFPROG_REQUIRE_DOCKER") == "1":
            pytest.fail(f"SELFPROG_REQUIRE_DOCKER=1 but the Docker backend cannot run: {why}")
        pytest.skip(f"Docker backend unavailable ({why}); run scripts/ci-docker.sh")
    c = docker.from_env(timeout=120)
    yield c
    reap_orphans(c, owner=OWNER)
    c.close()
