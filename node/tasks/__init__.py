"""Task plugins and the registry that finds them by name.

The registry imports a task's module only when the task is requested, so
checking a task name in a config does not load torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.tasks.base import Dataset, Device, Metrics, Task, TaskData

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

_BASE_NAMES = ("Dataset", "Device", "Metrics", "Task", "TaskData")


def __getattr__(name: str) -> Any:
    """Import the task base types on first use, because node.tasks.base imports torch."""
    if name in _BASE_NAMES:
        from node.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _digits() -> Task:
    from node.tasks.digits import DigitsTask

    return DigitsTask()


_FACTORIES: dict[str, Callable[[], Task]] = {"digits": _digits}
# Split names that each task's ``load_data`` accepts. The split of a task
# missing here is checked only when its data loads. The digits entry repeats
# node.tasks.digits.SPLITS, and a test checks that the two agree.
_SPLITS: dict[str, tuple[str, ...]] = {"digits": ("complementary", "iid")}


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
