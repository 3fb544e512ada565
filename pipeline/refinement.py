"""The random refinement dataset: pairs (source, refined source) of valid Python.

Each pair is a sampled design rendered as a module, and the same module after one
refinement (exactly one design parameter changed). The LM learns this text-to-text map;
asked to refine its own source later, it proposes candidates of the same kind.

The target starts with a header line naming the move, `# refine: num_heads +`, then the
refined source. Without it a small T5 learns how often each number changes, one number
at a time, and "exactly one changed" stays near 40% however long it trains; with it the
choice of parameter is one sampled token and every later number is copied conditioned on
it (measured: docs/REPRODUCTION.md). The header is cut off a generated sample
(`strip_header`) before the sample becomes a candidate.

Nothing here knows a family: each function asks the family the task names
(pipeline/families/). `task` is a `pipeline.catalog.TaskSpec`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import tokenizer as tk
from pipeline.catalog import TaskSpec
from pipeline.families import get_family

if TYPE_CHECKING:   # (settings validates arms against the proposers, which use this module)
    from pipeline.settings import RunConfig


def family_of(task: TaskSpec):
    return get_family(task.family)


def seed_design(config: RunConfig, task: TaskSpec):
    """The starting point: the paper's seed LM, or its one-hidden-layer-of-16 network."""
    return family_of(task).seed_design(config)


def render(design, task: TaskSpec) -> str:
    return family_of(task).render(design)


def parse(source: str, task: TaskSpec) -> dict | None:
    return family_of(task).parse(source)


def design_from_params(params: dict | None, config: RunConfig, task: TaskSpec):
    """The design a parsed source describes (for sources we rendered ourselves)."""
    return family_of(task).design_from_params(params, config)


def sample(rng: random.Random, config: RunConfig, task: TaskSpec):
    return family_of(task).sample_design(rng, config)


def space_kw(family, config: "RunConfig | None") -> dict:
    """The keyword that limits a family's refinements to the run's design space (a
    family without several spaces takes none)."""
    spaces = getattr(family, "SPACES", None)
    if not spaces or config is None:
        return {}
    return {"params": spaces[config.design_space]}


def refine(design, rng: random.Random, task: TaskSpec, config: "RunConfig | None" = None):
    family = family_of(task)
    return family.refine(design, rng, **space_kw(family, config))


HEADER = "# refine: "


def header(family, before, after) -> str:
    """The target's first line: which parameter the refinement moved, and which way."""
    moved = [p for p in family.PARAMS if getattr(before, p) != getattr(after, p)]
    if len(moved) != 1:
        raise ValueError(f"a refinement must move one parameter, not {moved}")
    return move_header(moved[0], "+" if getattr(after, moved[0]) > getattr(before, moved[0]) else "-")


def move_header(param: str, sign: str) -> str:
    return f"{HEADER}{param} {sign}\n"


def strip_header(text: str) -> str:
    """A generated sample without its header line (a sample may lack one)."""
    if text.startswith(HEADER):
        return text.split("\n", 1)[1] if "\n" in text else ""
    return text


def make_pairs(config: "RunConfig", task: TaskSpec, n: int, seed: int) -> list[tuple[str, str]]:
    """n (unrefined, header + refined) pairs, deterministic for the seed."""
    family = family_of(task)
    rng = random.Random(seed)
    pairs = []
    space = space_kw(family, config)
    for _ in range(n):
        design = family.sample_design(rng, config)
        refined = family.refine(design, rng, **space)
        pairs.append((family.render(design), header(family, design, refined) + family.render(refined)))
    return pairs


def edits(family, parent: dict | None, child: dict | None) -> int | None:
    """How many design parameters differ between two parsed sources (None: unparsable)."""
    if parent is None or child is None:
        return None
    return sum(parent.get(p) != child.get(p) for p in family.PARAMS)


def network_key(family, params: dict) -> tuple:
    key = getattr(family, "network_key", None)
    return key(params) if key else tuple(sorted(params.items()))


def choose_distinct(family, parent: dict | None, designs: list[dict | None], n: int) -> list[int]:
    """Which of the drawn samples become the n candidates, in draw order: first those
    that change the parent's network and no earlier choice builds the same one (an
    unparsable sample is kept: it is what was written, and it ends invalid); then, if
    that leaves fewer than n, the earliest of the rest. A copy of the input could only
    repeat the incumbent's score, and a repeat spends an evaluation on a known one."""
    seen = {network_key(family, parent)} if parent is not None else set()
    chosen: set[int] = set()
    for i, d in enumerate(designs):
        if len(chosen) == n:
            break
        if d is None:
            chosen.add(i)
            continue
        key = network_key(family, d)
        if key not in seen:
            seen.add(key)
            chosen.add(i)
    rest = [i for i in range(len(designs)) if i not in chosen]
    return sorted(chosen | set(rest[:n - len(chosen)]))


def _target_ids(tok, text: str) -> tuple[list[int], int]:
    """Token ids of a target and where its source starts: the header and the source are
    encoded apart, so the header's tokens never merge into the source's."""
    if text.startswith(HEADER) and "\n" in text:
        head, body = text.split("\n", 1)
        ids = tok.encode(head + "\n", add_special_tokens=False).ids
        return ids + tk.encode(tok, body), len(ids)
    return tk.encode(tok, text), 0


def copy_mask(src: list[int], tgt: list[int], start: int) -> list[int]:
    """1 where target token must be a copy of the source: the tokens of the refined source
    (from `start`) that agree with the unrefined one before and after the edit (the
    longest common prefix and suffix). The header and the edited number are 0."""
    body = tgt[start:]
    pre = 0
    while pre < min(len(src), len(body)) and src[pre] == body[pre]:
        pre += 1
    suf = 0
    while suf < min(len(src), len(body)) - pre and src[-1 - suf] == body[-1 - suf]:
        suf += 1
    return [0] * start + [1] * pre + [0] * (len(body) - pre - suf) + [1] * suf


def encode_pairs(tok, pairs: list[tuple[str, str]], path: Path,
                 weights: list[float] | None = None) -> int:
    """Tokenize pairs into the T5 data tensors of docs/CONTRACTS.md; returns the width.
    `copy_mask` marks the target tokens that copy the input (sandbox/lm_schedule.py
    measures how well the LM copies on a held-out file of this kind). `weights` (one per
    pair: how often fine-tuning draws it, sandbox/finetune.py) go in a `weight` tensor."""
    import torch
    from safetensors.torch import save_file
    srcs = [tk.encode(tok, a) for a, _ in pairs]
    tgts, masks = [], []
    for s, (_, b) in zip(srcs, pairs):
        t, start = _target_ids(tok, b)
        tgts.append(t)
        masks.append(copy_mask(s, t, start))
    s_len, t_len = max(map(len, srcs)), max(map(len, tgts))
    input_ids = torch.zeros(len(pairs), s_len, dtype=torch.long)
    mask = torch.zeros(len(pairs), s_len, dtype=torch.long)
    labels = torch.full((len(pairs), t_len), -100, dtype=torch.long)
    copy = torch.zeros(len(pairs), t_len, dtype=torch.long)
    for i, (s, t, m) in enumerate(zip(srcs, tgts, masks)):
        input_ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, :len(t)] = torch.tensor(t)
        copy[i, :len(m)] = torch.tensor(m)
    tensors = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "copy_mask": copy}
    if weights is not None:
        tensors["weight"] = torch.tensor(weights, dtype=torch.float32)
    save_file(tensors, str(path))
    return max(s_len, t_len)
