"""The task registry: what each task is, which family its sources belong to, and how
its score reads. Code asks a TaskSpec (`.self_programming`, `.direction`, `.score`,
`.family`) instead of testing task names.

A minimal version: "self" plus the vision tasks of pipeline/datasets.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class UnknownTask(ValueError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str                       # a pipeline/families module name
    score: str                        # "loss" (lower is better) or "accuracy"
    self_programming: bool = False    # the LM programs itself (its own source is c)
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    load: Callable | None = None

    @property
    def direction(self) -> str:
        return "min" if self.score == "loss" else "max"


SELF = TaskSpec("self", family="transformer", score="loss", self_programming=True)
TASKS: dict[str, TaskSpec] = {SELF.name: SELF}


def register_task(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def _vision(name: str) -> TaskSpec | None:
    from pipeline import datasets   # torch: only when a vision task is asked for
    task = datasets.TASKS.get(name)
    if task is None:
        return None
    return register_task(TaskSpec(name, family="cnn", score="accuracy",
                                  input_shape=tuple(task.input_shape),
                                  num_classes=task.num_classes, load=task.load))


def get_task(name: str) -> TaskSpec:
    spec = TASKS.get(name) or _vision(name)
    if spec is None:
        from pipeline import datasets
        raise UnknownTask(f"unknown task {name!r}; tasks: "
                          f"{', '.join(['self', *datasets.TASKS])}")
    return spec
