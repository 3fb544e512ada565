"""The random refinement dataset: pairs (source, refined source) of valid Python.

Each pair is a sampled design rendered as a module, and the same module after one
refinement (exactly one design parameter changed). The LM learns this text-to-text map;
asked to refine its own source later, it proposes candidates of the same kind.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import tokenizer as tk
from pipeline.families import cnn, transformer
from pipeline.settings import RunConfig


@dataclass(frozen=True)
class Target:
    """What the sources are for: the LM itself, or a vision task's input and classes."""
    family: str                      # "transformer" | "cnn"
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0


def seed_design(config: RunConfig, target: Target):
    """The starting point: the paper's seed LM, or its one-hidden-layer-of-16 network."""
    if target.family == "transformer":
        return transformer.Design(
            num_layers=config.seed_layers, num_decoder_layers=config.seed_decoder_layers,
            d_ff=config.seed_d_ff, num_heads=config.seed_heads, d_model=config.d_model,
            lr=config.lm_lr, batch_size=config.lm_batch_size)
    return cnn.SEED


def render(design, target: Target) -> str:
    if target.family == "transformer":
        return transformer.render(design)
    return cnn.render(design, target.input_shape, target.num_classes)


def parse(source: str, target: Target) -> dict | None:
    return (transformer if target.family == "transformer" else cnn).parse(source)


def design_from_params(params: dict | None, config: RunConfig, target: Target):
    """The design a parsed source describes (for sources we rendered ourselves)."""
    if params is None:
        raise ValueError("the source does not have the shape of its family")
    if target.family == "transformer":
        return transformer.Design(**{k: params[k] for k in transformer.PARAMS},
                                  d_model=params.get("d_model", config.d_model),
                                  lr=config.lm_lr, batch_size=config.lm_batch_size)
    return cnn.Design(**{k: params[k] for k in cnn.PARAMS},
                      lr=cnn.SEED.lr, batch_size=cnn.SEED.batch_size)


def sample(rng: random.Random, config: RunConfig, target: Target):
    if target.family == "transformer":
        return transformer.sample(rng, config.d_model, config.lm_lr, config.lm_batch_size)
    seed = cnn.SEED
    return cnn.sample(rng, seed.lr, seed.batch_size)


def refine(design, rng: random.Random, target: Target):
    return (transformer if target.family == "transformer" else cnn).refine(design, rng)


def make_pairs(config: RunConfig, target: Target, n: int, seed: int) -> list[tuple[str, str]]:
    """n (unrefined, refined) pairs, deterministic for the seed."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        design = sample(rng, config, target)
        pairs.append((render(design, target), render(refine(design, rng, target), target)))
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
