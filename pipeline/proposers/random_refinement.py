"""The control arm: the same search with the LM replaced by random single-parameter
refinements of the parent, drawn the way the LM's training pairs are
(pipeline/refinement.py `refine`). Deterministic for (seed, iteration, draw), so a
resumed or redelivered stage draws the very same sources."""
from __future__ import annotations

import random

from pipeline import refinement
from pipeline.proposers.base import Proposal

NAME = "random"
USES_LM = False


def job(request):
    return None


def propose(request, result=None):
    ctx = request.ctx
    params = refinement.parse(request.parent, ctx.task)
    design = refinement.design_from_params(params, ctx.config, ctx.task)
    out = []
    for i in range(request.n):
        rng = random.Random(f"{ctx.config.seed}-{request.index}-{i}")
        out.append(refinement.render(refinement.refine(design, rng, ctx.task, ctx.config), ctx.task))
    return Proposal(out)
