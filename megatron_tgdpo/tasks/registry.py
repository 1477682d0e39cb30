"""Task names (as written in the ``"task"`` field of prompt and sample files) -> task classes."""
from __future__ import annotations

import dataclasses
from typing import Any

from megatron_tgdpo.tasks.arithmetic import AdditionTask
from megatron_tgdpo.tasks.base import Task
from megatron_tgdpo.tasks.lists import ReverseTask, SortTask
from megatron_tgdpo.tasks.words import WordReverseTask, WordSortTask

__all__ = ["TASKS", "get_task"]

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (AdditionTask, SortTask, ReverseTask,
                                                        WordSortTask, WordReverseTask)}


def get_task(name: str, **params: Any) -> Task:
    """The task ``name`` with difficulty ``params`` (defaults for those not given).

    Scoring does not depend on the parameters (the reference answer fixes the length), so
    ``get_task(record["task"])`` scores any record of that task.
    """
    cls = TASKS.get(name)
    if cls is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"task {name!r} has no parameter {', '.join(map(repr, unknown))} "
            f"(its parameters: {', '.join(known) or 'none'})"
        )
    return cls(**params)
