"""A batch of attacks as the candidates of a real run iteration: the lineage DB loses nothing.

The LM "generates" hostile T5-family sources; they go through the loop's own path
(`stages._add_candidates`: a row per candidate, the gate's verdict recorded; then
`stages._dispatch(..., "evaluating")`: a real sandbox per surviving candidate, eager
Celery, the real process backend). Every row must end in a terminal state with a
reason (an evaluated one with its harness-computed score), the iteration must finish
with the keep-original decision, and the run must complete.
"""
from __future__ import annotations

import pytest

from pipeline import stages
from pipeline.settings import preset
from pipeline.store import TERMINAL_STATUSES
from tests.support.candidates import candidate
from tests.support.runs import embedded_settings as _settings, iteration_at_evaluation

FORGED = 1e-06

# name -> (expected row status, words in the reason (None: an evaluated row, which has
# no reason to check), source)
BATCH = {
    "fork_bomb": ("rejected", "import", candidate("import os\n", """
        while True:
            os.fork()
        """)),
    "write_result_file": ("rejected", "builtin-call", candidate("", """
        with open("out/result.json", "w") as f:
            f.write('{"status": "ok", "score": 1e-06}')
        """)),
    "monkeypatch_the_loss": ("rejected", "attribute-store", candidate(
        "import torch.nn.functional as F\n", """
        F.cross_entropy = lambda *a, **k: torch.zeros((), requires_grad=True)
        """)),
    "nul_byte": ("rejected", "encoding", candidate("# \x00\n", "pass\n")),
    "deeply_nested_ast": ("rejected", "nesting", candidate("x = " + "-" * 30000 + "1\n", "pass\n")),
    "memory_bomb": ("oom", "memory", candidate("", """
        hog = []
        for _ in range(64):
            t = torch.empty(256 * 1024 * 1024, dtype=torch.uint8)
            t[::4096].fill_(1)
            hog.append(t)
        """)),
    "system_exit_0": ("invalid", "SystemExit", candidate("", "raise SystemExit(0)\n")),
    "print_fake_result": ("evaluated", None, candidate("", f"""
        print('{{"status": "ok", "score": {FORGED}}}')
        print("score: {FORGED}")
        """)),
}


@pytest.mark.root("the process sandbox")   # skips without root; fails in CI
def test_attack_batch_as_run_candidates_all_end_recorded(sqlite_url, tmp_path):
    settings = _settings(sqlite_url, tmp_path, sandbox_memory_mb=1024)
    config = preset("smoke", iterations=1, candidates=len(BATCH), eval_timeout_s=60.0)
    store, ctx, inc = iteration_at_evaluation(settings, config,
                                              [src for _, _, src in BATCH.values()])
    run_id = ctx.run_id
    stages._dispatch(store, ctx, 0, "lm", "evaluating")

    assert store.get_run(run_id).status == "completed", store.get_run(run_id).error
    rows = {c.index: c for c in store.candidates(run_id)}
    assert len(rows) == len(BATCH) + 1                      # nothing lost, nothing doubled
    assert all(c.status in TERMINAL_STATUSES for c in rows.values())
    assert rows[0].status == "evaluated" and rows[0].score > 0
    for i, (name, (status, words, _)) in enumerate(BATCH.items(), start=1):
        row = rows[i]
        assert row.status == status, (name, row.status, row.reason)
        if status == "evaluated":
            assert row.score is not None and row.score != FORGED and row.score > 0.05, name
        else:
            assert words and words.lower() in row.reason.lower(), (name, row.reason)
            assert row.score is None, name
    it = store.get_iteration(run_id, 0)
    assert it.stage == "done" and it.selected_id in (inc.id, rows[len(BATCH)].id)
