"""Task plugins and the registry that finds them by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from node.tasks.base import Dataset, Device, Metrics, Task, TaskData
from node.tasks.digits import SPLITS as DIGITS_SPLITS
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
    "task_splits",
]

_FACTORIES: dict[str, Callable[[], Task]] = {"digits": DigitsTask}
# Split names that each task's ``load_data`` accepts. The split of a task
# missing here is checked only when its data loads.
_SPLITS: dict[str, tuple[str, ...]] = {"digits": DIGITS_SPLITS}


def register_task(name: str, factory: Callable[[], Task], *, splits: Sequence[str] = ()) -> None:
    """Make ``get_task(name)`` return ``factory()``; raises ValueError if the name is taken.

    ``splits`` names the values of ``split`` that the task's ``load_data``
    accepts, so that configs can be checked before any data loads. Leave it
    empty when the task does not define a fixed set.
    """
    if name in _FACTORIES:
        raise ValueError(f"task {name!r} is already registered; pick another name")
    _FACTORIES[name] = factory
    if splits:
        _SPLITS[name] = tuple(splits)


def task_names() -> list[str]:
    return sorted(_FACTORIES)


def task_splits(name: str) -> tuple[str, ...]:
    """Return the split names task ``name`` accepts, or () when the task does not fix them."""
    return _SPLITS.get(name, ())


def get_task(name: str) -> Task:
    """Return a new instance of the task registered as ``name``."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return factory()
