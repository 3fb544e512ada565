"""The paper's proposer: the LM that the current source defines (the seed LM for a vision
task), trained on random refinements, samples n refinements of the parent in one
`generate` sandbox job. The header line naming the move is cut off each sample
(pipeline/refinement.py)."""
from __future__ import annotations

from pipeline import refinement
from pipeline import tokenizer as tk
from pipeline.proposers.base import Proposal

NAME = "lm"
USES_LM = True


def job(request):
    return request.ctx.generate_job(request.arm, request.index, request.parent, request.n)


def decode(request, result) -> list[str]:
    """The samples of a generate job's result as sources (none when it failed)."""
    if result is None or result.status != "ok":
        return []
    tok = request.ctx.tokenizer
    return [refinement.strip_header(tk.decode(tok, ids)) for ids in result.samples]


def propose(request, result):
    return Proposal(decode(request, result),
                    {"gen_seconds": result.duration_s if result is not None else None})
