"""The random refinement dataset: pairs (source, refined source) of valid Python.

Each pair is a sampled design rendered as a module, and the same module after one
refinement (exactly one design parameter changed). The LM learns this text-to-text map;
asked to refine its own source later, it proposes candidates of the same kind.

Nothing here knows a family: each function asks the family the task names
(pipeline/families/). `task` is a `pipeline.catalog.TaskSpec`.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import tokenizer as tk
from pipeline.catalog import TaskSpec
from pipeline.families import get_family
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


def refine(design, rng: random.Random, task: TaskSpec):
    return family_of(task).refine(design, rng)


def make_pairs(config: RunConfig, task: TaskSpec, n: int, seed: int) -> list[tuple[str, str]]:
    """n (unrefined, refined) pairs, deterministic for the seed."""
    family = family_of(task)
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        design = family.sample_design(rng, config)
        pairs.append((family.render(design), family.render(family.refine(design, rng))))
    return pairs


def encode_pairs(tok, pairs: list[tuple[str, str]], path: Path) -> int:
    """Tokenize pairs into the T5 data tensors of docs/CONTRACTS.md; returns the width."""
    srcs = [tk.encode(tok, a) for a, _ in pairs]
    tgts = [tk.encode(tok, b) for _, b in pairs]
    s_len, t_len = max(map(len, srcs)), max(map(len, tgts))
    input_ids = torch.zeros(len(pairs), s_len, dtype=torch.long)
    mask = torch.zeros(len(pairs), s_len, dtype=torch.long)
    labels = torch.full((len(pairs), t_len), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        input_ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, :len(t)] = torch.tensor(t)
    save_file({"input_ids": input_ids, "attention_mask": mask, "labels": labels}, str(path))
    return max(s_len, t_len)
