"""Interpolating two 1 GiB parameter sets, and the alpha search, against memory copy.

Two sets of 8 float32 tensors of 128 MiB each. Per device (the CPU, and
each CUDA GPU that torch finds), interleaved round by round:

* copy: `Tensor.copy_` of the whole set into tensors allocated once, the
  memory bandwidth baseline;
* copy into new tensors: `Tensor.clone`, which also pays for allocating and
  first touching the memory, as the alpha search does for its buffers;
* interpolate: `node.merge.interpolate` of the two sets into the buffers of
  an earlier result (the steady state of the alpha search);
* search: `node.merge.search_merge` over its ten default alphas with an
  evaluation that reads one number, so interpolation and its one set of
  buffers are nearly all its cost; its rate counts the ten interpolated sets;
* previous: `(1 - alpha) * local + alpha * incoming` into new tensors, as
  `interpolate` did before it used `torch.lerp` and reused buffers.

Rates are GiB of merged parameters written per second. A copy reads 1 GiB
and writes 1 GiB; an interpolation reads 2 GiB and writes 1 GiB, so it also
shows the bandwidth each achieved (bytes read plus written per second).
Target: interpolation at least 0.7 times the rate of a copy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from node.merge import DEFAULT_ALPHAS, interpolate, search_merge
from scripts.benchmarks.record import Result

GIB = 1 << 30
TENSORS = 8
ROUNDS = 5


class OneNumber:
    """Evaluation result whose loss is the first element of the first tensor."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.loss = abs(float(next(iter(params.values()))[0]))
        self.accuracy = 0.0


def parameter_set(seed: int, device: str) -> dict[str, Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    count = GIB // 4 // TENSORS
    return {f"layer{i}.weight": torch.randn(count, generator=generator, device=device) for i in range(TENSORS)}


def previous_interpolate(local: Mapping[str, Tensor], incoming: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    return {name: ((1.0 - alpha) * mine + alpha * incoming[name]).to(mine.dtype) for name, mine in local.items()}


def timed(function: Callable[[], object], device: str) -> float:
    if device != "cpu":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if device != "cpu":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def measure(device: str) -> dict[str, list[float]]:
    """GiB written per second of each subject, one value per round."""
    local, incoming = parameter_set(1, device), parameter_set(2, device)
    copies = {name: torch.empty_like(tensor) for name, tensor in local.items()}
    buffers = interpolate(local, incoming, 0.5)

    def copy() -> None:
        for name, tensor in local.items():
            copies[name].copy_(tensor)

    subjects: dict[str, tuple[Callable[[], object], float]] = {
        "copy": (copy, 1.0),
        "clone": (lambda: {name: tensor.clone() for name, tensor in local.items()}, 1.0),
        "interpolate": (lambda: interpolate(local, incoming, 0.35, out=buffers), 1.0),
        "search": (lambda: search_merge(local, incoming, OneNumber), float(len(DEFAULT_ALPHAS))),
        "previous": (lambda: previous_interpolate(local, incoming, 0.35), 1.0),
    }
    copy()  # touch the copy's memory once, so no round pays for first use
    rates: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(ROUNDS):
        for name, (function, sets) in subjects.items():
            rates[name].append(sets / timed(function, device))
    return rates


def main() -> Result:
    result = Result(
        name="merge",
        title="interpolating two 1 GiB parameter sets, against memory copy",
        columns=["device", "operation", "GiB/s written (median)", "runs", "vs copy", "bandwidth GiB/s (read + written)"],
    )
    devices = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    started = time.monotonic()
    verdicts = []
    for device in devices:
        rates = measure(device)
        medians = {name: statistics.median(values) for name, values in rates.items()}
        traffic = {"copy": 2.0, "clone": 2.0, "interpolate": 3.0, "search": 3.0, "previous": 3.0}
        labels = {
            "copy": "copy (baseline)",
            "clone": "copy into new tensors",
            "interpolate": "interpolate into reused buffers",
            "search": "search over 10 alphas, cheap evaluation",
            "previous": "previous interpolate (new tensors, 3 passes)",
        }
        name_of = device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
        for name, label in labels.items():
            result.rows.append([
                name_of, label, f"{medians[name]:.2f}", " / ".join(f"{rate:.2f}" for rate in rates[name]),
                f"{medians[name] / medians['copy']:.2f}", f"{medians[name] * traffic[name]:.2f}",
            ])
        ratio = medians["interpolate"] / medians["copy"]
        verdicts.append(f"{device}: {ratio:.2f} ({'met' if ratio >= 0.7 else 'NOT met'})")
    threads = torch.get_num_threads()
    result.notes.append(
        f"{TENSORS} float32 tensors of {GIB // TENSORS // 2**20} MiB per set, {ROUNDS} rounds, torch "
        f"{torch.__version__} with {threads} CPU threads. Target (interpolation at least 0.7 times the copy rate): "
        + "; ".join(verdicts) + "."
    )
    if len(devices) == 1:
        result.notes.append("torch found no CUDA device on this machine, so there are no GPU rows.")
    result.notes.append(f"The benchmark took {(time.monotonic() - started) / 60:.1f} minutes.")
    return result
