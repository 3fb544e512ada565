"""The task registry: what each task is, which family its sources belong to, and how
its score reads. Code asks a task's TaskSpec (`.self_programming`, `.score`,
`.direction`, `.family`) instead of testing task names.

Built in: "self" (the LM programs itself: transformer sources scored by few-shot loss)
and every vision task of pipeline/datasets.py (CNN sources scored by accuracy). The
vision tasks are registered on first use, so asking for "self" never imports torch.

Adding a task: a TaskSpec and one `register_task(spec)` line. A task with a data set
gives `load(data_dir, *, train_samples, eval_samples, seed)` returning a
`pipeline.datasets.TaskData`; its family must build with `build_model(input_shape,
num_classes)` (sandbox model kind "cnn").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.families import get_family
# score -> which way is better: the sandbox's own table (an evaluate job's score kind is
# checked against it), so a task cannot name a score the sandbox does not compute
from sandbox.schema import SCORE_KINDS


class UnknownTask(ValueError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str                       # a pipeline/families registry name
    score: str                        # "loss" (lower is better) or "accuracy"
    self_programming: bool = False    # the LM refines its own source (the LM is the model)
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    load: Callable | None = None      # the task's data (None: the refinement corpus is it)

    def __post_init__(self):
        if self.score not in SCORE_KINDS:
            raise ValueError(f"score must be one of {', '.join(SCORE_KINDS)}, got {self.score!r}")

    @property
    def direction(self) -> str:
        """"min" when a lower score is better (a loss), else "max"."""
        return SCORE_KINDS[self.score]


SELF = TaskSpec("self", family="transformer", score="loss", self_programming=True)
TASKS: dict[str, TaskSpec] = {}
_vision_registered = False


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task (its family must be registered already); returns it."""
    get_family(spec.family)   # raises UnknownFamily
    TASKS[spec.name] = spec
    return spec


def unregister_task(name: str) -> None:
    TASKS.pop(name, None)


def _register_vision_tasks() -> None:
    global _vision_registered
    if _vision_registered:
        return
    from pipeline import datasets   # torch: only when a vision task is asked for
    for task in datasets.TASKS.values():
        TASKS.setdefault(task.name, TaskSpec(
            task.name, family="cnn", score="accuracy", input_shape=tuple(task.input_shape),
            num_classes=task.num_classes, load=task.load))
    _vision_registered = True


def get_task(name: str) -> TaskSpec:
    spec = TASKS.get(name)
    if spec is None:
        _register_vision_tasks()
        spec = TASKS.get(name)
    if spec is None:
        raise UnknownTask(f"unknown task {name!r}; tasks: {', '.join(task_names())}")
    return spec


def task_names() -> list[str]:
    """Every registered task, the vision tasks included."""
    _register_vision_tasks()
    return list(TASKS)


register_task(SELF)
