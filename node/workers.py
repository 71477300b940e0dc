"""The worker pool: runs training, evaluation and merging off the trio thread.

Every device (each CUDA GPU, or the CPU) runs one job at a time in a worker
thread, so two jobs never compete for one GPU's memory. Jobs receive their
device as a string ("cpu", "cuda:0", ...) and pass it down to torch, so the
same job code runs on either. torch is imported on first use, not when this
module is imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:[0-9]+")


class WorkerError(ValueError):
    """A ``[workers] device`` setting that this machine cannot satisfy."""


def resolve_devices(setting: str) -> tuple[str, ...]:
    """Turn a ``[workers] device`` setting into the device strings to run jobs on.

    "auto" gives every visible CUDA GPU, or the CPU when there is none;
    "cuda" gives every GPU; "cuda:N" gives GPU N. Raises WorkerError when a
    requested GPU is missing. Imports torch.
    """
    if DEVICE_PATTERN.fullmatch(setting) is None:
        raise WorkerError(f"[workers] device {setting!r} is invalid; use auto, cpu, cuda or cuda:N")
    if setting == "cpu":
        return ("cpu",)

    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = tuple(f"cuda:{index}" for index in range(count))
    if setting == "auto":
        return gpus or ("cpu",)
    if not gpus:
        raise WorkerError(
            f"[workers] device is {setting!r} but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); set device = \"cpu\" or \"auto\""
        )
    if setting == "cuda":
        return gpus
    index = int(setting.removeprefix("cuda:"))
    if index >= count:
        raise WorkerError(
            f"[workers] device is {setting!r} but torch sees {count} GPU(s), "
            f"cuda:0 to cuda:{count - 1}; pick one of those"
        )
    return (setting,)


class WorkerPool:
    """Runs blocking jobs in threads, one at a time per device.

    Only use it from trio code in one trio run; `run` is the only
    coroutine. The setting is validated at once, but the devices are
    found, which imports torch, on the first `run` or `devices` access.
    """

    def __init__(self, device: str) -> None:
        if DEVICE_PATTERN.fullmatch(device) is None:
            raise WorkerError(f"[workers] device {device!r} is invalid; use auto, cpu, cuda or cuda:N")
        self.setting = device
        self._devices: tuple[str, ...] | None = None
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._load: dict[str, int] = {}  # jobs waiting for or running on each device

    @property
    def devices(self) -> tuple[str, ...]:
        """Device strings that jobs run on. The first access imports torch and blocks."""
        if self._devices is None:
            self._set_devices(resolve_devices(self.setting))
        assert self._devices is not None
        return self._devices

    def _set_devices(self, devices: tuple[str, ...]) -> None:
        if self._devices is not None:  # another task resolved them first
            return
        self._limiters = {device: trio.CapacityLimiter(1) for device in devices}
        self._load = dict.fromkeys(devices, 0)
        self._devices = devices

    async def run(self, job: Callable[[str], T]) -> T:
        """Run ``job(device)`` in a worker thread on the least busy device and return its result.

        Exceptions from the job propagate. A job that has started runs to
        the end even if the calling task is cancelled, because a thread
        cannot be interrupted. A job still waiting for its device is
        cancelled normally.
        """
        if self._devices is None:
            # Importing torch takes seconds, so it happens in a thread.
            self._set_devices(await trio.to_thread.run_sync(resolve_devices, self.setting))
        devices = self.devices
        # min() returns the first device among equally loaded ones.
        device = min(devices, key=lambda name: self._load[name])
        self._load[device] += 1
        try:
            async with self._limiters[device]:
                return await trio.to_thread.run_sync(job, device)
        finally:
            self._load[device] -= 1
