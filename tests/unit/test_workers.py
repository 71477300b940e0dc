"""Tests for the worker pool: threads, one job per device, results and errors."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import trio

from node import workers
from node.workers import WorkerError, WorkerPool, resolve_devices


class OverlapRecorder:
    """A job that records which devices ran it and how many ran at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.max_total = 0
        self.threads: set[int] = set()

    def __call__(self, device: str) -> str:
        with self.lock:
            self.active[device] = self.active.get(device, 0) + 1
            self.max_active[device] = max(self.max_active.get(device, 0), self.active[device])
            self.max_total = max(self.max_total, sum(self.active.values()))
            self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        with self.lock:
            self.active[device] -= 1
        return device


async def test_job_runs_off_trio_thread() -> None:
    pool = WorkerPool("cpu")
    trio_thread = threading.get_ident()

    job_thread = await pool.run(lambda device: threading.get_ident())

    assert job_thread != trio_thread


async def test_job_gets_device_and_returns() -> None:
    pool = WorkerPool("cpu")

    result = await pool.run(lambda device: f"ran on {device}")

    assert result == "ran on cpu"
    assert pool.devices == ("cpu",)


async def test_one_job_at_a_time_per_device() -> None:
    pool = WorkerPool("cpu")
    recorder = OverlapRecorder(seconds=0.05)
    results: list[str] = []

    async def submit() -> None:
        results.append(await pool.run(recorder))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(submit)

    assert results == ["cpu"] * 4
    assert recorder.max_active == {"cpu": 1}


async def test_devices_run_in_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two fake devices: the pool only passes device strings to jobs.
    monkeypatch.setattr(workers, "resolve_devices", lambda setting: ("gpu-a", "gpu-b"))
    pool = WorkerPool("cuda")
    recorder = OverlapRecorder(seconds=0.1)
    results: list[str] = []

    async def submit() -> None:
        results.append(await pool.run(recorder))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(submit)

    assert sorted(results) == ["gpu-a", "gpu-a", "gpu-b", "gpu-b"]
    assert recorder.max_active == {"gpu-a": 1, "gpu-b": 1}
    assert recorder.max_total == 2


async def test_job_exception_propagates() -> None:
    pool = WorkerPool("cpu")

    def fail(device: str) -> None:
        raise ArithmeticError(f"bad step on {device}")

    with pytest.raises(ArithmeticError, match="bad step on cpu"):
        await pool.run(fail)
    # The device is free again after a failed job.
    assert await pool.run(lambda device: device) == "cpu"


@pytest.mark.parametrize("setting", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_invalid_setting(setting: str) -> None:
    with pytest.raises(WorkerError, match="is invalid"):
        WorkerPool(setting)


def test_resolve_cpu() -> None:
    assert resolve_devices("cpu") == ("cpu",)


def test_resolve_auto() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = tuple(f"cuda:{index}" for index in range(count)) or ("cpu",)

    assert resolve_devices("auto") == expected


def test_resolve_missing_gpu() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0

    with pytest.raises(WorkerError, match=f"sees {count} GPU" if count else "sees no CUDA GPU"):
        resolve_devices(f"cuda:{count}")
