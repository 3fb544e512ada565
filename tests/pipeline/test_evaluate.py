"""`selfprog-cli evaluate FILE` (pipeline/cli/evaluate.py): one source scored exactly as a
run scores a candidate (the same gate, job, sandbox task and status words), with nothing
written to the lineage database."""
from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline import stages
from pipeline.cli import main
from pipeline.settings import preset
from tests.support.runs import embedded_settings, iteration_at_evaluation


def _evaluate(tmp_path, path, *args: str):
    db = tmp_path / "never.db"
    result = CliRunner().invoke(main, ["--database-url", f"sqlite:///{db}", "--artifact-dir",
                                       str(tmp_path / "cli-artifacts"), "evaluate", str(path),
                                       "--backend", "process", *args])
    assert not db.exists(), "evaluate wrote a lineage database"
    return result


def test_evaluate_gives_the_score_a_run_records(sqlite_url, tmp_path):
    settings = embedded_settings(sqlite_url, tmp_path)
    config = preset("smoke", iterations=1, candidates=1)
    store, ctx, inc = iteration_at_evaluation(settings, config, lambda ctx: [
        ctx.seed_source().replace("lr=0.01", "lr=0.02")])
    stages._dispatch(store, ctx, 0, "lm", "evaluating")
    row = store.candidates(ctx.run_id, iteration=0)[1]
    assert row.status == "evaluated" and row.score is not None

    f = tmp_path / "candidate.py"
    f.write_text(row.source)
    result = _evaluate(tmp_path, f, "--preset", "smoke", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    out = json.loads(result.stdout)
    assert out["status"] == "evaluated" and out["reason"] == ""
    assert out["score"] == row.score and out["param_count"] == row.param_count
    assert out["task"] == "self" and out["direction"] == "min"
    # the key the run stored its evaluation under (pipeline/evaluations.py), and its parts
    assert out["evaluation_key"] == row.evaluation_key
    assert out["key_parts"] == store.get_evaluation(row.evaluation_key).parts
    assert out["usage"]["wall_s"] > 0 and out["usage"]["backend"].startswith("process:")
    assert out["usage"]["cpu_s"] > 0 and out["usage"]["peak_rss_mb"] > 50
    from tests.support.jsondoc import documented_keys
    assert documented_keys()["evaluate"] == [frozenset(out)]

    text = _evaluate(tmp_path, f, "--preset", "smoke")   # the table form, from the prepared cache
    assert text.exit_code == 0 and "status:      evaluated" in text.output
    assert f"parameters:  {row.param_count}" in text.output


def test_evaluate_reports_a_rejected_source_without_running_it(tmp_path):
    f = tmp_path / "hostile.py"
    f.write_text("import os\n\ndef build_model(vocab_size):\n    os.system('id')\n")
    result = _evaluate(tmp_path, f, "--json")
    assert result.exit_code == 2
    out = json.loads(result.stdout)
    assert out["status"] == "rejected" and out["reason"].startswith("import:")
    assert out["score"] is None
    assert not (tmp_path / "cli-artifacts").exists()     # nothing prepared, nothing run
