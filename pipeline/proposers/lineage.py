"""The lineage proposer: the `lm` proposer's LM, fine-tuned inside the generate job on the
run's own improving edits before it samples.

The paper's LM learns uniform random refinements, so it proposes what a random mutation
operator proposes. This arm also learns from what the search found: after each
iteration, every single-parameter edit of this arm that beat its parent becomes a
training pair (parent source -> header naming the move + child source), weighted by
its advantage (how much it gained, in the task's score), and the LM takes a few
optimizer steps on batches that mix those pairs with corpus pairs, so it keeps copying
the source around the edit (sandbox/finetune.py). With nothing improved yet it samples
exactly as `lm` does. Fine-tuning starts from the trained weights each time: the job is
a pure function of the lineage so far, and a redelivered job draws the same pairs.
"""
from __future__ import annotations

from pipeline import refinement
from pipeline.proposers import history, lm

NAME = "lineage"
USES_LM = True


def pairs(family, edits: list[history.Edit]) -> tuple[list[tuple[str, str]], list[float]]:
    """Training pairs and weights: the improving single edits, weighted by advantage."""
    out, weights = [], []
    for e in edits:
        m = history.move(family, e.parent_design, e.child_design)
        if m is None or e.advantage() <= 0:
            continue
        out.append((e.parent_source, refinement.move_header(*m) + e.child_source))
        weights.append(e.advantage())
    return out, weights


def _pairs(request):
    ctx = request.ctx
    edits = history.edits(store_of(ctx), ctx.run_id, request.arm, request.index,
                          ctx.task.direction)
    return pairs(ctx.family, edits)


def job(request):
    ctx = request.ctx
    train, weights = _pairs(request)
    path = None
    if train:
        path = ctx.arm_dir(request.arm) / f"lineage-i{request.index}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        refinement.encode_pairs(ctx.tokenizer, train, path, weights=weights)
    return ctx.generate_job(request.arm, request.index, request.parent, request.n, lineage=path)


def store_of(ctx):
    from pipeline.store import store_for
    return store_for(ctx.settings.database_url)


def propose(request, result):
    proposal = lm.propose(request, result)
    # A generate job's losses are its fine-tuning steps' (sandbox/harness.py).
    ok = result is not None and result.status == "ok"
    proposal.metadata.update(finetune_pairs=len(_pairs(request)[0]),
                             finetune_losses=list(result.losses) if ok and result.losses else None)
    return proposal
