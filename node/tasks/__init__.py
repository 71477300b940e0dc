"""Task plugins and the registry that finds them by name."""

from __future__ import annotations

from collections.abc import Callable

from node.tasks.base import Dataset, Device, Metrics, Task, TaskData
from node.tasks.digits import DigitsTask

__all__ = [
    "Dataset",
    "Device",
    "Metrics",
    "Task",
    "TaskData",
    "get_task",
    "register_task",
    "task_names",
]

_FACTORIES: dict[str, Callable[[], Task]] = {"digits": DigitsTask}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make ``get_task(name)`` return ``factory()``; raises ValueError if the name is taken."""
    if name in _FACTORIES:
        raise ValueError(f"task {name!r} is already registered; pick another name")
    _FACTORIES[name] = factory


def task_names() -> list[str]:
    return sorted(_FACTORIES)


def get_task(name: str) -> Task:
    """Return a new instance of the task registered as ``name``."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return factory()
