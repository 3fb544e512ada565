"""Lineages written through the store API, the way the loop writes them (an incumbent
per iteration, generated candidates as its children, a result each, the winner the
next iteration's incumbent), without training anything: for the web view's tests and
its benchmark, which read lineages and need many of them."""
from __future__ import annotations

import random

from pipeline.store import LineageStore

SEED = "def build_model(vocab_size):\n    width = 64\n    layers = 2\n    return width, layers\n"


def variant(source: str, rng: random.Random) -> str:
    """One design parameter of `source` changed, as a refinement would."""
    lines = source.splitlines(keepends=True)
    i = rng.choice([n for n, line in enumerate(lines) if " = " in line])
    name, _, _ = lines[i].partition(" = ")
    lines[i] = f"{name} = {rng.randint(1, 512)}\n"
    return "".join(lines)


def add_iteration(store: LineageStore, run_id: str, index: int, incumbent_source: str,
                  parent_id: int | None, candidates: int, rng: random.Random, *,
                  arm: str = "lm", sources: list[str] | None = None,
                  finish: bool = True) -> tuple[str, int]:
    """Iteration `index` of `arm`: its incumbent, `candidates` children (or `sources`),
    all evaluated; finished (selected, decided, done) unless `finish` is False.
    Returns the selected source and candidate id."""
    store.ensure_iteration(run_id, index, source_in=incumbent_source, arm=arm)
    inc = store.ensure_candidate(run_id, index, 0, role="incumbent", source=incumbent_source,
                                 parent_id=parent_id, design={"width": 64}, arm=arm)
    base = 5.0 - 0.3 * index
    store.record_result(inc.id, status="evaluated", score=base, param_count=1000,
                        duration_s=1.0, logs="incumbent ran\n")
    best_id, best_score, best_source = inc.id, base, incumbent_source
    children = sources if sources is not None else [variant(incumbent_source, rng)
                                                    for _ in range(candidates)]
    for i, source in enumerate(children, 1):
        c = store.ensure_candidate(run_id, index, i, role="candidate", source=source,
                                   parent_id=inc.id, design={"width": i}, arm=arm)
        if i % 4 == 3:
            store.record_result(c.id, status="invalid", reason="build_model raised ValueError",
                                logs="Traceback (most recent call last):\nValueError\n")
            continue
        score = base + rng.uniform(-0.5, 0.5)
        store.record_result(c.id, status="evaluated", score=score, param_count=900 + i,
                            duration_s=0.5, logs=f"candidate {i} trained\n",
                            declaration={"model": "t5", "width": i})
        if score < best_score:
            best_id, best_score, best_source = c.id, score, source
    if finish:
        store.update_iteration(
            run_id, index, arm=arm, stage="done", incumbent_id=inc.id, selected_id=best_id,
            decision="kept" if best_id == inc.id else "replaced",
            lm_losses=[3.0 * 0.97 ** s + 0.1 * index for s in range(120)] if arm == "lm" else [],
            lm_copy_accuracy=0.9 if arm == "lm" else None,
            lm_p_intact=0.8 if arm == "lm" else None, lm_stop="criterion" if arm == "lm" else None,
            single_edit_rate=0.6)
    else:
        store.update_iteration(run_id, index, arm=arm, stage="evaluating", incumbent_id=inc.id)
    return best_source, best_id


def fill_run(store: LineageStore, *, iterations: int = 3, candidates: int = 4,
             arms: tuple[str, ...] = ("lm", "random"), status: str = "completed",
             seed: int = 0) -> str:
    """A run of `iterations` finished iterations per arm, `candidates` children each."""
    rng = random.Random(seed)
    run_id = store.create_run(config={"iterations": iterations, "candidates": candidates,
                                      "arms": list(arms)},
                              task="self", preset="quick", seed=seed)
    store.set_run_status(run_id, "running")
    for arm in arms:
        source, parent = SEED, None
        for index in range(iterations):
            source, parent = add_iteration(store, run_id, index, source, parent, candidates,
                                           rng, arm=arm)
    if status != "running":
        store.set_run_status(run_id, status)
    return run_id
