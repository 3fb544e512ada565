"""The layout of the repository: the packages pyproject.toml ships are the ones on disk,
and the Alembic migrations have one home, the top-level migrations/."""
import tomllib
from pathlib import Path

from pipeline.store import schema

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_lists_every_package_on_disk():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for top in ("pipeline", "sandbox") for p in (REPO / top).rglob("__init__.py")}
    mapped = set(config["package-dir"])
    assert set(config["packages"]) - mapped == on_disk
    assert mapped == {"pipeline.store.migrations"}
    assert config["package-dir"]["pipeline.store.migrations"] == "migrations"


def test_migrations_live_only_at_the_top_level():
    assert (REPO / "migrations" / "env.py").is_file()
    assert sorted((REPO / "migrations" / "versions").glob("0001_*.py"))
    assert not (REPO / "pipeline" / "store" / "migrations").exists()
    assert schema.MIGRATIONS_DIR == REPO / "migrations"
    assert "script_location = migrations" in (REPO / "alembic.ini").read_text()
