"""Families of model sources the LM learns to refine.

A family knows its design parameters and their ranges, how to sample a design, how to
refine one (change exactly one parameter), how to render a design as a runnable Python
module, and how to read the design back from a source by parsing it (never by running it).
"""
from __future__ import annotations

from pipeline.families import cnn, transformer

FAMILIES = {"transformer": transformer, "cnn": cnn}


def family_for_task(task: str):
    return transformer if task == "self" else cnn
