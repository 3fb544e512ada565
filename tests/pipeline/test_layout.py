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


# The fast tier (`make test-fast`) must run these: a selection rule that never replaces,
# or a cancel that never reaches a running sandbox, would pass every other fast test.
FAST_MUST = (
    "tests/pipeline/test_selection.py::"
    "test_selection_keeps_the_original_unless_a_candidate_is_strictly_better",
    "tests/pipeline/test_recovery.py::test_cancel_mid_evaluation_stops_the_sandbox_and_the_run",
)


def make_variable(name: str) -> list[str]:
    """The words of a `NAME := ...` line of the Makefile (with its continuations)."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{name} :="))
    return line.split(":=", 1)[1].split()


def test_the_fast_tier_runs_the_selection_rule_and_a_cancel():
    import importlib

    tiers = make_variable("FAST_TESTS")
    ignored = {arg.split("=", 1)[1] for arg in make_variable("FAST_IGNORE")}
    for node in FAST_MUST:
        path, name = node.split("::")
        assert any(path == t or path.startswith(t.rstrip("/") + "/") for t in tiers), node
        assert path not in ignored, node
        module = importlib.import_module(path[:-3].replace("/", "."))
        marks = getattr(getattr(module, name), "pytestmark", [])
        module_marks = getattr(module, "pytestmark", [])
        module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
        assert not {m.name for m in [*marks, *module_marks]} & {"slow", "docker"}, node
