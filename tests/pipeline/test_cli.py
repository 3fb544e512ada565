"""selfprog-cli query commands against a lineage store filled through its API.

The store is real (SQLite file and PostgreSQL, via `database_url`); the loop is not run
here (`launch` end to end is tested with the loop), only launch's input errors.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main, print_progress
from pipeline.families import get_family
from pipeline.store import LineageStore
from tests.support.jsondoc import documented_keys

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def design(d_ff: int, layers: int = 2) -> dict:
    return {"num_layers": layers, "num_decoder_layers": 2, "d_ff": d_ff, "num_heads": 8}


def source(d_ff: int, layers: int = 2) -> str:
    return ("from transformers import T5Config\n"
            f"NUM_LAYERS = {layers}\n"
            f"D_FF = {d_ff}\n"
            "NUM_HEADS = 8\n")


@pytest.fixture
def populated(database_url):
    """Two iterations of a self-programming run: iteration 0 replaces the seed,
    iteration 1 keeps it. Returns the URL and the ids the tests look at."""
    with LineageStore(database_url, create=True) as s:
        run_id = s.create_run(config={"iterations": 2, "candidates": 2, "d_model": 32},
                              task="self", preset="quick", seed=3)
        s.set_run_status(run_id, "running")
        # iteration 0: the seed (score 3.0) is beaten by candidate 1 (score 2.0)
        s.ensure_iteration(run_id, 0, source_in=source(1024))
        seed = s.ensure_candidate(run_id, 0, 0, role="incumbent", source=source(1024),
                                  parent_id=None, design=design(1024))
        good = s.ensure_candidate(run_id, 0, 1, role="candidate", source=source(900),
                                  parent_id=seed.id, design=design(900))
        bad = s.ensure_candidate(run_id, 0, 2, role="candidate", source="import os\n",
                                 parent_id=seed.id, design=None, status="rejected",
                                 reason="import of 'os' is not allowed by the policy " * 4)
        s.mark_running([seed.id, good.id])
        s.record_result(seed.id, status="evaluated", score=3.0, param_count=1_000_000,
                        losses=[3.5, 3.0])
        s.record_result(good.id, status="evaluated", score=2.0, param_count=900_000,
                        declaration=DECLARED)
        s.update_iteration(run_id, 0, stage="done", incumbent_id=seed.id, selected_id=good.id,
                           decision="replaced", lm_losses=[4.0, 3.0, 2.5, 2.2],
                           lm_copy_accuracy=0.998, lm_p_intact=0.83, lm_stop="criterion",
                           single_edit_rate=0.5)
        # iteration 1: the incumbent copies the winner; its only rival times out
        s.ensure_iteration(run_id, 1, source_in=source(900))
        inc = s.ensure_candidate(run_id, 1, 0, role="incumbent", source=source(900),
                                 parent_id=good.id, design=design(900))
        slow = s.ensure_candidate(run_id, 1, 1, role="candidate", source=source(900, layers=3),
                                  parent_id=inc.id, design=design(900, layers=3))
        s.record_result(inc.id, status="evaluated", score=1.9)
        s.record_result(slow.id, status="timeout", reason="deadline of 120 s exceeded")
        s.update_iteration(run_id, 1, stage="done", incumbent_id=inc.id, selected_id=inc.id,
                           decision="kept", lm_losses=[2.4, 2.0, 1.7], lm_copy_accuracy=0.97,
                           lm_p_intact=0.31, lm_stop="budget", single_edit_rate=0.0)
        s.set_run_status(run_id, "completed")
        other = s.create_run(config={}, task="mnist", preset="quick", seed=0)
        yield {"url": database_url, "run": run_id, "other": other, "seed": seed.id,
               "good": good.id, "bad": bad.id, "inc": inc.id, "slow": slow.id}


DECLARED = {"model": {"d_model": 64}, "optimizer": "AdamW", "hyper": {"lr": 0.003},
            "batch_size": 16}


def cli(url: str | None, *args: str, env: dict | None = None):
    prefix = ["--database-url", url] if url else []
    result = CliRunner().invoke(main, [*prefix, *args], env=env)
    return result


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def clean_error(result, fragment: str):
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]
    assert result.stdout == ""


# ------------------------------------------------------------------- runs

def test_runs_table_and_json(populated):
    out = ok(cli(populated["url"], "runs")).stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["id", "task", "preset", "status"]
    # newest first: the mnist run was created last
    assert lines[2].startswith(populated["other"]) and lines[3].startswith(populated["run"])
    assert "completed" in lines[3] and "1.9000" in lines[3]

    data = json.loads(ok(cli(populated["url"], "runs", "--json")).stdout)
    assert [r["id"] for r in data] == [populated["other"], populated["run"]]
    mine = data[1]
    assert mine["iterations_done"] == 2
    assert mine["best_score"] == 1.9           # lowest selected loss
    assert mine["config"]["d_model"] == 32 and mine["finished_at"]
    assert data[0]["best_score"] is None and data[0]["iterations_done"] == 0


def test_runs_uses_environment_url(populated):
    result = ok(cli(None, "runs", "--json", env={"SELFPROG_DATABASE_URL": populated["url"]}))
    assert len(json.loads(result.stdout)) == 2


def test_runs_empty(sqlite_url):
    LineageStore(sqlite_url, create=True).close()
    assert "no runs yet" in ok(cli(sqlite_url, "runs")).stdout
    assert json.loads(ok(cli(sqlite_url, "runs", "--json")).stdout) == []


# ------------------------------------------------------------------- show

def test_show(populated):
    out = ok(cli(populated["url"], "show", populated["run"][:6])).stdout
    assert f"run {populated['run']}" in out and "status=completed" in out
    assert "iterations=2" in out and "d_model=32" in out
    rows = [ln for ln in out.splitlines() if ln.startswith(("0 ", "1 "))]
    assert len(rows) == 2
    assert "enc=2 dec=2 d_ff=900 heads=8" in rows[0]    # the transformer family's names
    assert "2.0000" in rows[0] and "3.0000" in rows[0]
    assert "replaced" in rows[0] and "1/2" in rows[0]
    assert "kept" in rows[1] and "1.9000" in rows[1] and "0/1" in rows[1]
    # the LM's training: steps (and a cap that stopped it), p_intact, single-edit share;
    # no lineage fine-tuning, no repeats (the lm arm of a run without improving moves)
    assert rows[0].split()[-5:] == ["4", "83%", "50%", "-", "-"]
    assert rows[1].split()[-6:] == ["3", "budget", "31%", "0%", "-", "-"]


def test_show_json(populated):
    data = json.loads(ok(cli(populated["url"], "show", populated["run"], "--json")).stdout)
    assert data["id"] == populated["run"] and data["config"]["candidates"] == 2
    first, second = data["iterations"]
    assert first == {"index": 0, "arm": "lm", "stage": "done", "selected_id": populated["good"],
                     "design": design(900), "score": 2.0, "incumbent_id": populated["seed"],
                     "incumbent_score": 3.0, "decision": "replaced", "evaluated": 1, "total": 2,
                     "lm_steps": 4, "lm_copy_accuracy": 0.998, "lm_p_intact": 0.83,
                     "lm_stop": "criterion", "single_edit_rate": 0.5, "finetune_steps": None,
                     "finetune_loss": None, "finetune_pairs": None, "repeat_rate": None}
    assert (second["decision"], second["score"], second["evaluated"], second["total"]) == (
        "kept", 1.9, 0, 1)


def test_show_without_iterations(populated):
    assert "no iterations yet" in ok(cli(populated["url"], "show", populated["other"])).stdout


# ------------------------------------------------------------- candidates

def test_candidates(populated):
    out = ok(cli(populated["url"], "candidates", populated["run"])).stdout
    lines = out.splitlines()
    assert len(lines) == 2 + 5 + 1              # header, rule, 5 candidates, the legend
    assert lines[-1].startswith("eval: ")
    rejected = next(ln for ln in lines if ln.startswith(f"{populated['bad']} "))
    assert "rejected" in rejected and "import of 'os'" in rejected
    assert len(rejected) < 160                 # the long reason is shortened
    assert "1,000,000" in out


def test_candidates_filters(populated):
    url, run = populated["url"], populated["run"]
    data = json.loads(ok(cli(url, "candidates", run, "--status", "evaluated", "--json")).stdout)
    assert [c["id"] for c in data] == [populated["seed"], populated["good"], populated["inc"]]
    assert data[0]["source"].startswith("from transformers") and data[0]["sha256"]
    data = json.loads(ok(cli(url, "candidates", run, "--iteration", "1", "--json")).stdout)
    assert [c["status"] for c in data] == ["evaluated", "timeout"]
    data = json.loads(ok(cli(url, "candidates", run, "--arm", "random", "--json")).stdout)
    assert data == []
    assert "no candidates match" in ok(cli(url, "candidates", run, "--arm", "random")).stdout
    result = cli(url, "candidates", run, "--status", "exploded")
    assert result.exit_code == 2 and "Traceback" not in result.output


# ---------------------------------------------------------------- lineage

def test_lineage(populated):
    out = ok(cli(populated["url"], "lineage", str(populated["slow"]))).stdout
    steps = [ln for ln in out.splitlines() if ln.startswith("[")]
    ids = [int(ln.split()[2]) for ln in steps]
    assert ids == [populated["seed"], populated["good"], populated["inc"], populated["slow"]]
    assert "-D_FF = 1024" in out and "+D_FF = 900" in out
    assert "-NUM_LAYERS = 2" in out and "+NUM_LAYERS = 3" in out
    # the incumbent copy has the same source as its parent: no diff between them
    assert out.count("--- candidate") == 2
    assert f"+++ candidate {populated['inc']}" not in out
    # designs as the run's family (transformer, the "self" task's) names them
    assert "    design: enc=3 dec=2 d_ff=900 heads=8" in out.splitlines()


def test_lineage_json(populated):
    data = json.loads(ok(cli(populated["url"], "lineage", str(populated["good"]),
                             "--json")).stdout)
    assert [s["id"] for s in data] == [populated["seed"], populated["good"]]
    assert data[0]["diff"] == "" and data[0]["parent_id"] is None
    assert "+D_FF = 900" in data[1]["diff"]
    assert data[1]["score"] == 2.0 and data[1]["design"] == design(900)


# ------------------------------------------------------------------- plot

def test_plot(populated, tmp_path):
    out_dir = tmp_path / "figs" / "nested"
    result = ok(cli(populated["url"], "plot", populated["run"], "--out", str(out_dir)))
    paths = result.stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["lm_loss.png", "score.png", "copying.png",
                                                     "search.png"]
    for p in paths:
        data = open(p, "rb").read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plot_default_dir_and_json(populated, tmp_path):
    art = tmp_path / "artifacts"
    result = ok(cli(populated["url"], "--artifact-dir", str(art), "plot", populated["other"],
                    "--json"))
    data = json.loads(result.stdout)
    assert data["run_id"] == populated["other"]
    for p in data["files"]:
        assert p.startswith(str(art / populated["other"] / "plots"))
        assert open(p, "rb").read(8) == PNG_SIGNATURE   # an empty run still plots


def test_plot_unwritable_out(populated, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    clean_error(cli(populated["url"], "plot", populated["run"], "--out",
                    str(blocker / "sub")), "cannot write plots")


# ----------------------------------------------------------------- errors

def test_unknown_run(populated):
    for command in ("show", "candidates", "plot"):
        clean_error(cli(populated["url"], command, "ffffffffffff"), "unknown run")


def test_unknown_candidate(populated):
    clean_error(cli(populated["url"], "lineage", "987654"), "unknown candidate 987654")
    result = cli(populated["url"], "lineage", "abc")
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize("url, fragment", [
    ("definitely not a url", "bad database URL"),
    ("postgresql+psycopg2://postgres@127.0.0.1:1/test", "cannot open database"),
    ("nosuchdialect://x/y", "unsupported database URL"),
])
def test_bad_database_url(url, fragment):
    clean_error(cli(url, "runs"), fragment)


def test_missing_sqlite_file_is_not_created(tmp_path):
    path = tmp_path / "typo.db"
    clean_error(cli(f"sqlite:///{path}", "runs"), "no lineage database")
    assert not path.exists()


def test_launch_unknown_preset(sqlite_url):
    clean_error(cli(sqlite_url, "launch", "--preset", "nope"), "unknown preset 'nope'")


@pytest.mark.parametrize("setting, fragment", [
    ("iterations", "expects KEY=VALUE"),
    ("=3", "expects KEY=VALUE"),
    ("no_such_field=1", "unknown run setting 'no_such_field'"),
    ("iterations=many", "not a valid int"),
    ("candidates=0", "candidates must be an integer in [1, 64], got 0"),
    ("sample_factor=0", "sample_factor must be an integer in [1, 64], got 0"),
    ("seed=-1", "seed must be an integer in [0, 2147483647], got -1"),
    ("lm_lr=nan", "lm_lr must be a number in (0, 10], got nan"),
    ("sweep=../elsewhere", "sweep must be empty or a name"),
])
def test_launch_bad_set(tmp_path, setting, fragment):
    """One `Error:` line, and nothing launched: not even the database is created."""
    db = tmp_path / "lineage.db"
    clean_error(cli(f"sqlite:///{db}", "launch", "--set", setting), fragment)
    assert not db.exists()


def test_launch_refuses_more_draws_than_one_generate_job_returns(tmp_path):
    db = tmp_path / "lineage.db"
    clean_error(cli(f"sqlite:///{db}", "launch", "--set", "candidates=16",
                    "--set", "sample_factor=8"),
                "candidates x sample_factor is 128, more than the 64 samples")
    assert not db.exists()


def test_launch_bad_backend(sqlite_url):
    result = cli(sqlite_url, "launch", "--backend", "vm")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_help_everywhere():
    import click

    for args in ([], ["runs"], ["show"], ["candidates"], ["lineage"], ["plot"], ["launch"]):
        assert "Usage:" in ok(CliRunner().invoke(main, [*args, "--help"])).stdout
    # every command and every option explains itself
    commands = [main, *main.commands.values()]
    assert {c.name for c in commands[1:]} >= {"runs", "show", "candidates", "lineage",
                                              "plot", "launch"}
    for command in commands:
        assert command.help and len(command.help) > 20, command.name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{command.name} {param.opts}"


# --------------------------------------------------------------- progress

def test_progress_lines(capsys):
    print_progress("stage", {"iteration": 0, "stage": "training"})
    print_progress("candidate", {"iteration": 0, "index": 2, "status": "evaluated",
                                 "score": 1.23456})
    print_progress("candidate", {"iteration": 0, "index": 3, "status": "timeout",
                                 "score": None})
    print_progress("candidate", {"iteration": 0, "index": 4, "status": "evaluated",
                                 "score": 1.5, "reused": True})
    print_progress("iteration", {"iteration": 0, "decision": "replaced", "score": 1.2,
                                 "design": design(900)}, get_family("transformer"))
    print_progress("iteration", {"iteration": 1, "decision": "kept", "score": 1.2,
                                 "design": design(900)})     # no family known: the keys
    print_progress("lm_trained", {"iteration": 1, "steps": 256, "final_loss": 0.38312718})
    print_progress("lm_trained", {"iteration": 2, "steps": 1400, "final_loss": 0.05,
                                  "p_intact": 0.8312, "copy_accuracy": 0.99871, "stop": "criterion"})
    print_progress("generated", {"iteration": 2, "samples": 8, "single_edit_rate": 0.875})
    print_progress("resumed", {"from_iteration": 2})
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "[iteration 0] training",
        "[iteration 0] candidate 2: evaluated  score 1.2346",
        "[iteration 0] candidate 3: timeout",
        "[iteration 0] candidate 4: evaluated  score 1.5000  (reused: evaluated before, no sandbox)",
        "[iteration 0] replaced: score 1.2000  enc=2 dec=2 d_ff=900 heads=8",
        "[iteration 1] kept: score 1.2000  num_layers=2 num_decoder_layers=2 d_ff=900 "
        "num_heads=8",
        "[iteration 1] LM trained: 256 steps, loss 0.3831",
        "[iteration 2] LM trained: 1400 steps, loss 0.0500, copies its input: p_intact 0.83, "
        "copy accuracy 0.999 (stopped: criterion)",
        "[iteration 2] 8 samples, 88% change exactly one parameter",
        "[run] resumed from_iteration=2",
    ]


# ------------------------------------------------------- the database's schema

def _revision(url: str) -> tuple[str, ...]:
    from pipeline.store import current_revisions, make_engine
    engine = make_engine(url)
    try:
        return current_revisions(engine)
    finally:
        engine.dispose()


def _old_database(url: str) -> None:
    """A lineage database at revision 0002 (before the CHECK constraint renames)."""
    from pipeline.store import make_engine, upgrade_schema
    engine = make_engine(url)
    try:
        upgrade_schema(engine, "0002_rescore")
    finally:
        engine.dispose()


def test_queries_refuse_an_old_schema_and_write_nothing(database_url):
    _old_database(database_url)
    for args in (["runs"], ["show", "abcd"], ["candidates", "abcd"], ["lineage", "1"]):
        clean_error(cli(database_url, *args), "run `selfprog-cli db upgrade`")
    assert _revision(database_url) == ("0002_rescore",)
    result = cli(database_url, "db", "current")
    assert result.exit_code == 1 and "0002_rescore" in result.stdout
    assert "selfprog-cli db upgrade" in result.stdout


def test_db_upgrade_then_queries_work(database_url):
    from pipeline.store import head_revisions
    _old_database(database_url)
    out = json.loads(ok(cli(database_url, "db", "upgrade", "--json")).stdout)
    assert out["from"] == ["0002_rescore"] and out["to"] == list(head_revisions())
    assert out["upgraded"] is True
    assert "no runs yet" in ok(cli(database_url, "runs")).stdout
    again = ok(cli(database_url, "db", "upgrade"))
    assert "nothing to do" in again.stdout
    current = json.loads(ok(cli(database_url, "db", "current", "--json")).stdout)
    assert current["up_to_date"] is True and current["current"] == list(head_revisions())


def test_db_upgrade_creates_a_new_sqlite_database(tmp_path):
    path = tmp_path / "new.db"
    ok(cli(f"sqlite:///{path}", "db", "upgrade"))
    assert path.exists()
    assert "no runs yet" in ok(cli(f"sqlite:///{path}", "runs")).stdout


def test_db_current_does_not_create_a_file(tmp_path):
    path = tmp_path / "typo.db"
    clean_error(cli(f"sqlite:///{path}", "db", "current"), "no lineage database")
    assert not path.exists()


def test_launch_creates_a_fresh_sqlite_database(tmp_path):
    # launch creates (and migrates) the database before anything else: with a broker
    # that does not answer it stops right after that, in a second.
    from pipeline.store import head_revisions
    path = tmp_path / "fresh" / "lineage.db"
    result = cli(f"sqlite:///{path}", "launch", "--detach",
                 env={"SELFPROG_BROKER_URL": "redis://127.0.0.1:1/0"})
    clean_error(result, "does not answer")
    assert _revision(f"sqlite:///{path}") == tuple(head_revisions())
    assert "no runs yet" in ok(cli(f"sqlite:///{path}", "runs")).stdout


@pytest.mark.slow
def test_installed_package_launches_from_an_unrelated_directory(tmp_path):
    # `pip install .` (not editable): the migrations must travel inside the package.
    # Installed with --no-deps into a directory of its own that the interpreter running
    # the tests (which has the dependencies) puts first on its path, so nothing is
    # downloaded and torch is not installed again; the repository is off the path.
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"   # a copy: building in place would leave build/ in the repo
    shutil.copytree(repo, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "selfprog-artifacts", "*.db",
        ".ci", "tests", "bench"))
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("SELFPROG_")}
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                            "--no-build-isolation", "--no-index", "--quiet",
                            "--disable-pip-version-check", f"--target={site}", str(src)],
                           env=env, cwd=tmp_path, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert (site / "pipeline" / "store" / "migrations" / "versions").is_dir()
    shutil.rmtree(src)   # nothing of the source tree is left to fall back on
    work = tmp_path / "elsewhere"
    work.mkdir()
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
                           env=env, cwd=work, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), (where.stdout, where.stderr)
    launch = subprocess.run([sys.executable, str(site / "bin" / "selfprog-cli"), "launch",
                             "--preset", "smoke", "--iterations", "1", "--candidates", "2",
                             "--backend", "process", "--set", "lm_epochs=1",
                             "--set", "fewshot_epochs=1", "--json"],
                            env=env, cwd=work, capture_output=True, text=True, timeout=900)
    assert launch.returncode == 0, launch.stderr[-3000:]
    out = json.loads(launch.stdout)
    assert out["status"] == "completed", out
    assert set(out) == REPORT_KEYS, out   # docs/json.md
    assert (work / "selfprog.db").exists()


# ------------------------------------------------------------ --json, pinned

RUN_KEYS = {"id", "task", "preset", "seed", "status", "error", "config", "created_at",
            "updated_at", "finished_at"}
ROW_KEYS = {"index", "arm", "stage", "selected_id", "design", "score", "incumbent_id",
            "incumbent_score", "decision", "evaluated", "total", "lm_steps", "lm_copy_accuracy",
            "lm_p_intact", "lm_stop", "single_edit_rate", "finetune_steps", "finetune_loss",
            "finetune_pairs", "repeat_rate"}
ARM_KEYS = {"start", "end", "iterations_done", "end_params", "end_design"}
CANDIDATE_KEYS = {"id", "run_id", "iteration", "index", "arm", "role", "parent_id", "status",
                  "reason", "score", "rescore", "flagged", "param_count", "duration_s",
                  "design", "sha256", "source", "logs", "declaration", "created_at",
                  "started_at", "finished_at", "reused", "evaluation"}
LINEAGE_KEYS = {"id", "run_id", "iteration", "index", "arm", "role", "parent_id", "status",
                "score", "design", "sha256", "diff", "reused", "evaluation"}
EVALUATION_KEYS = {"key", "parts", "backend", "host", "wall_s", "cpu_s", "peak_rss_mb",
                   "first_run_id", "reuses"}
SUMMARY_KEYS = {"sandbox", "reused", "sandbox_wall_s", "sandbox_cpu_s", "saved_wall_s"}
REPORT_KEYS = {"run_id", "status", "error", "iterations"}


def test_every_json_output_has_exactly_its_documented_keys(populated, tmp_path):
    url, run = populated["url"], populated["run"]
    doc = documented_keys()

    def same(section: str, *sets) -> None:
        assert doc[section] == [frozenset(s) for s in sets], (section, doc.get(section))

    def js(*args, **env):
        return json.loads(ok(cli(url, *args, env=env or None)).stdout)

    same("run", RUN_KEYS)
    same("iteration row", ROW_KEYS)
    same("arm outcome", ARM_KEYS)
    runs = js("runs", "--json")
    assert len(runs) == 2
    for r in runs:
        assert set(r) == RUN_KEYS | {"iterations_done", "best_score"}, set(r)
    same("runs", RUN_KEYS | {"iterations_done", "best_score"})

    # one candidate scored through a stored evaluation, one reusing it
    key = "e" * 64
    with LineageStore(url) as s:
        rows = s.candidates(run)
        fresh = s.ensure_candidate(run, 9, 0, role="incumbent", source=rows[0].source,
                                   parent_id=None, design=None)
        again = s.ensure_candidate(run, 9, 1, role="candidate", source=rows[0].source,
                                   parent_id=fresh.id, design=None)
        s.complete_evaluation(key, claimant="t", parts={"version": 1}, status="ok",
                              reusable=True, score=1.5, duration_s=2.0, run_id=run,
                              usage={"wall_s": 2.0, "cpu_s": 1.5, "peak_rss_mb": 200.0,
                                     "backend": "process:x", "host": "h"})
        s.record_result(fresh.id, status="evaluated", score=1.5, evaluation_key=key)
        s.record_result(again.id, status="evaluated", score=1.5, evaluation_key=key, reused=True)

    shown = js("show", run, "--json")
    assert set(shown) == RUN_KEYS | {"iterations", "arms", "evaluations"}
    assert all(set(row) == ROW_KEYS for row in shown["iterations"])
    assert set(shown["arms"]) == {"lm"} and set(shown["arms"]["lm"]) == ARM_KEYS
    assert shown["evaluations"] == {"sandbox": 1, "reused": 1, "sandbox_wall_s": 2.0,
                                    "sandbox_cpu_s": 1.5, "saved_wall_s": 2.0}
    same("show", RUN_KEYS | {"iterations", "arms", "evaluations"})
    same("evaluation summary", SUMMARY_KEYS)
    text = ok(cli(url, "show", run)).stdout
    assert "evaluations: 1 in a sandbox (2.0s wall, 1.5s CPU), 1 reused (2.0s saved)" in text

    cands = js("candidates", run, "--json")
    assert len(cands) == 7 and all(set(c) == CANDIDATE_KEYS for c in cands)
    same("candidates", CANDIDATE_KEYS)
    scored = [c for c in cands if c["evaluation"] is not None]
    assert [c["reused"] for c in scored] == [False, True]
    assert all(set(c["evaluation"]) == EVALUATION_KEYS for c in scored)
    assert scored[0]["evaluation"]["reuses"] == 1 and scored[0]["evaluation"]["cpu_s"] == 1.5
    same("evaluation", EVALUATION_KEYS)
    table_text = ok(cli(url, "candidates", run)).stdout
    assert "eeeeeeee reused" in table_text
    steps = js("lineage", str(populated["slow"]), "--json")
    assert len(steps) == 4 and all(set(s) == LINEAGE_KEYS for s in steps)
    same("lineage", LINEAGE_KEYS)
    assert set(js("lineage", str(again.id), "--json")[-1]["evaluation"]) == EVALUATION_KEYS
    assert set(js("plot", run, "--out", str(tmp_path / "p"), "--json")) == {"run_id", "files"}
    same("plot", {"run_id", "files"})

    # resume of a completed run reports it at once, like a launch that ended
    resumed = js("resume", run, "--json")
    assert set(resumed) == REPORT_KEYS and resumed["status"] == "completed"
    assert all(set(row) == ROW_KEYS for row in resumed["iterations"])
    same("launch and resume (following)", REPORT_KEYS)
    same("launch --detach and resume --detach", {"run_id", "status"})
    with LineageStore(url) as s:   # a run waiting to start, to cancel
        pending = s.create_run(config={}, task="self", preset="quick", seed=0)
    cancelled = js("cancel", pending, "--json")
    assert cancelled == {"run_id": pending, "status": "cancelled", "candidates_cancelled": 0}
    same("cancel", set(cancelled))

    up = js("db", "upgrade", "--json")
    assert set(up) == {"database", "from", "to", "head", "upgraded"}
    same("db upgrade", set(up))
    cur = js("db", "current", "--json")
    assert set(cur) == {"database", "current", "head", "up_to_date"}
    same("db current", set(cur))

    result = cli(url, "doctor", "--skip-canary", "--json",
                 env={"SELFPROG_BROKER_URL": "", "SELFPROG_SANDBOX_BACKEND": "process",
                      "SELFPROG_ARTIFACT_DIR": str(tmp_path / "art")})
    doctor = json.loads(result.stdout)
    assert set(doctor) == {"ok", "checks"} and doctor["checks"]
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in doctor["checks"])
    same("doctor", {"ok", "checks"}, {"name", "status", "detail", "fix"})

    swept = js("--artifact-dir", str(tmp_path / "art"), "sweep", "--task", "digits",
               "--candidates", "2", "--iterations", "1", "--name", "pinned", "--no-launch",
               "--json")
    assert set(swept) == {"sweep", "task", "figure", "cells"} and len(swept["cells"]) == 1
    cell_keys = {"candidates", "iterations", "total", "run_id", "status", "start", "lm",
                 "random", "lineage"}
    assert set(swept["cells"][0]) == cell_keys
    same("sweep", {"sweep", "task", "figure", "cells"}, cell_keys)
    same("watch", {"event", "run_id", "status", "error"})
