"""Fine-tuning on a run's own lineage, inside a `generate` job, before the LM samples
(the lineage proposer, pipeline/proposers/lineage.py).

The job brings two files of the T5 data tensors (docs/CONTRACTS.md): `lineage`, the
arm's improving edits (parent source -> header naming the move + child source) with a
`weight` per pair (its advantage), and `data`, the refinement corpus. Every step trains
on one batch that mixes the two: `finetune_mix` of it corpus pairs drawn uniformly (so
the LM keeps copying the source around an edit), the rest lineage pairs drawn in
proportion to their weight (so an edit that gained more is learnt more). AdamW at
`finetune_lr` for `finetune_steps` steps; the loss is the harness's own (training.py
`t5_loss`). Returns the loss of every step.
"""
from __future__ import annotations

import math

from sandbox.guards import CandidateError, Trusted
from sandbox.schema import Job
from sandbox.training import t5_loss


def finetune(model, lineage: dict, corpus: dict, job: Job, device, t: Trusted) -> list[float]:
    torch = t.torch
    steps = int(job.params.get("finetune_steps", 0))
    batch = int(job.params.get("finetune_batch", 16))
    mix = float(job.params.get("finetune_mix", 0.5))
    weights = lineage["weight"].double().clamp(min=0)
    if steps == 0 or float(weights.sum()) <= 0:
        return []
    n_corpus = min(batch - 1, round(batch * mix))   # at least one lineage pair a step
    n_lineage = batch - n_corpus
    gen = t.Generator().manual_seed(int(job.params.get("seed", 0)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(job.params["finetune_lr"]))
    corpus_size = corpus["input_ids"].shape[0]
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        picks = torch.multinomial(weights, n_lineage, replacement=True, generator=gen)
        loss = t5_loss(model, lineage, picks, device, t) * (n_lineage / batch)
        if n_corpus:
            rows = torch.randint(corpus_size, (n_corpus,), generator=gen)
            loss = loss + t5_loss(model, corpus, rows, device, t) * (n_corpus / batch)
        with t.no_subclass_fn():
            value = t.float(t.item(t.detach(loss)))
        if not math.isfinite(value):
            raise CandidateError(f"the fine-tuning loss became non-finite at step {len(losses)}")
        optimizer.zero_grad(set_to_none=True)
        t.backward(loss)
        t.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(value)
    model.eval()
    return losses
