"""Checks, interpolation and weight matching for named sets of tensors.

Every function here is pure: it reads ``Mapping[str, Tensor]`` values keyed by
``state_dict()`` names and returns new dictionaries. Nothing touches files or
the network, and no function picks a device. Where two inputs meet, the
incoming tensor is moved to the local tensor's device and dtype.

Weight matching follows "Git Re-Basin" (Ainsworth, Hayase, Srinivasa, ICLR
2023, section 3.2): hidden units of one model are permuted so that its weights
line up with another model's, which makes interpolating two independently
initialised models meaningful.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# Mixing weights tried by `search_merge`: 0.05, 0.15, ..., 0.95.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.05 + 0.1 * step, 2) for step in range(10))

# Upper bound on sweeps over all permutations in `match_weights`. Each sweep
# either raises the total similarity or ends the search, so this only guards
# against floating-point ties that keep flipping between equal assignments.
MAX_MATCHING_SWEEPS = 100


class HasLossAndAccuracy(Protocol):
    """Result of one evaluation, as returned by a task's ``evaluate``."""

    @property
    def loss(self) -> float: ...

    @property
    def accuracy(self) -> float: ...


@dataclass(frozen=True)
class PermutationSpec:
    """Hidden-unit permutations of a model and the tensor axes each acts on.

    ``axes`` maps a permutation name to its ``(tensor name, axis)`` pairs. For
    a layer ``fc1`` feeding ``fc2``, the permutation of fc1's units acts on
    ``("fc1.weight", 0)``, ``("fc1.bias", 0)`` and ``("fc2.weight", 1)``.
    Each tensor axis may belong to at most one permutation.
    """

    axes: Mapping[str, tuple[tuple[str, int], ...]]
    tensor_axes: dict[str, dict[int, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tensor_axes: dict[str, dict[int, str]] = {}
        for perm_name, pairs in self.axes.items():
            if not pairs:
                raise ValueError(
                    f"permutation {perm_name!r} acts on no tensor; give it at least one (tensor, axis) pair"
                )
            for tensor_name, axis in pairs:
                owner = tensor_axes.setdefault(tensor_name, {}).get(axis)
                if owner is not None:
                    raise ValueError(
                        f"axis {axis} of tensor {tensor_name!r} is claimed by both permutation "
                        f"{owner!r} and {perm_name!r}; each axis may belong to one permutation only"
                    )
                tensor_axes[tensor_name][axis] = perm_name
        object.__setattr__(self, "tensor_axes", tensor_axes)


@dataclass(frozen=True)
class MergeResult:
    """Outcome of an alpha search between a local model and incoming weights.

    ``params`` contains the merge at the best ``alpha`` even when ``gain <= 0``.
    Callers keep their local model unless ``gain > 0``.
    """

    alpha: float
    loss_before: float
    loss_after: float
    accuracy_before: float
    accuracy_after: float
    gain: float  # (loss_before - loss_after) / loss_before; 0.0 when loss_before is 0
    params: dict[str, Tensor]
    losses: dict[float, float]  # validation loss at every alpha tried

    @property
    def improved(self) -> bool:
        return self.gain > 0


def check_compatible(local: Mapping[str, Tensor], incoming: Mapping[str, Tensor]) -> list[str]:
    """List every reason ``incoming`` cannot be merged into ``local``.

    ``incoming`` may hold a subset of local's tensors, so a missing tensor is
    not a problem. A name that local lacks, a different dtype and a different
    shape are. An empty list means the two are compatible.
    """
    if not incoming:
        return ["incoming contains no tensors; offer at least one of the local model's tensors"]
    problems: list[str] = []
    for name, tensor in incoming.items():
        expected = local.get(name)
        if expected is None:
            problems.append(f"{name}: unknown tensor; the local model has no tensor of that name")
            continue
        if tensor.dtype != expected.dtype:
            problems.append(f"{name}: dtype is {tensor.dtype}, expected {expected.dtype}")
        if tensor.shape != expected.shape:
            problems.append(
                f"{name}: shape is {tuple(tensor.shape)}, expected {tuple(expected.shape)}"
            )
    return problems


def check_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """Name each floating-point tensor that contains NaN or Inf, with counts."""
    problems: list[str] = []
    for name, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        nan_count = int(torch.isnan(tensor).sum())
        inf_count = int(torch.isinf(tensor).sum())
        if nan_count or inf_count:
            problems.append(
                f"{name}: {nan_count} NaN and {inf_count} Inf values out of {tensor.numel()}"
            )
    return problems


def interpolate(
    local: Mapping[str, Tensor],
    incoming: Mapping[str, Tensor],
    alpha: float,
    *,
    out: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Return ``(1 - alpha) * local + alpha * incoming`` on incoming's tensors.

    Local tensors that ``incoming`` lacks, and all non-floating-point tensors
    (integer buffers such as step counters), are copied from ``local``. The
    mix is one `torch.lerp` per tensor, exact at alpha 0 and 1; half
    precision tensors are mixed in float32 inside it and rounded once to
    local's dtype. Each result tensor is written into the tensor of the same
    name in ``out`` when that one has local's shape, dtype and device (a
    buffer from an earlier call), else into a new tensor. Raises ValueError
    when ``alpha`` is outside [0, 1] or the inputs fail `check_compatible`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is {alpha}; it must be in [0, 1]")
    problems = check_compatible(local, incoming)
    if problems:
        raise ValueError("incoming tensors do not fit the local model: " + "; ".join(problems))

    merged: dict[str, Tensor] = {}
    for name, mine in local.items():
        target = _buffer_like(mine, out.get(name) if out is not None else None)
        theirs = incoming.get(name)
        if theirs is None or not mine.is_floating_point():
            merged[name] = target.copy_(mine)
            continue
        # check_compatible made the dtypes equal; only the device may differ.
        merged[name] = torch.lerp(mine, theirs.to(mine.device), alpha, out=target)
    return merged


def _buffer_like(tensor: Tensor, buffer: Tensor | None) -> Tensor:
    """Return `buffer` if it can hold a result shaped like `tensor`, else a new tensor."""
    if (
        buffer is not None
        and buffer.shape == tensor.shape
        and buffer.dtype == tensor.dtype
        and buffer.device == tensor.device
        and buffer.is_contiguous()
    ):
        return buffer
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def search_merge(
    local: Mapping[str, Tensor],
    incoming: Mapping[str, Tensor],
    evaluate: Callable[[Mapping[str, Tensor]], HasLossAndAccuracy],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> MergeResult:
    """Evaluate the local model and each interpolation, and return the best.

    ``evaluate`` measures a set of parameters on the buyer's validation data.
    The best alpha has the lowest validation loss; ties go to the smaller
    alpha, which moves the local model least. Because ``gain`` compares that
    loss with the local model's, a positive gain always means
    ``loss_after < loss_before``.

    Every interpolation goes into one set of buffers, so the search needs
    memory for one more copy of the model, and ``evaluate`` must not keep
    the mapping it gets, or its tensors, after it returns. Unless the best
    alpha was the last one tried, the best interpolation is computed once
    more at the end. That costs less than keeping a second copy: on a
    2-core machine, one `torch.lerp` of 1 GiB took less time than
    allocating and first touching 1 GiB (see `./scripts/bench merge`).
    """
    if not alphas:
        raise ValueError(
            "alphas is empty; pass at least one mixing weight, for example DEFAULT_ALPHAS"
        )
    before = evaluate(local)
    best_alpha = alphas[0]
    best_loss = float("inf")
    best_accuracy = 0.0
    losses: dict[float, float] = {}
    candidate: dict[str, Tensor] | None = None
    for alpha in alphas:
        candidate = interpolate(local, incoming, alpha, out=candidate)
        metrics = evaluate(candidate)
        losses[alpha] = metrics.loss
        if metrics.loss < best_loss:
            best_alpha, best_loss, best_accuracy = alpha, metrics.loss, metrics.accuracy
    if best_alpha != alphas[-1]:
        candidate = interpolate(local, incoming, best_alpha, out=candidate)
    assert candidate is not None
    gain = (before.loss - best_loss) / before.loss if before.loss > 0 else 0.0
    return MergeResult(
        alpha=best_alpha,
        loss_before=before.loss,
        loss_after=best_loss,
        accuracy_before=before.accuracy,
        accuracy_after=best_accuracy,
        gain=gain,
        params=candidate,
        losses=losses,
    )


def _permuted(
    spec: PermutationSpec,
    perms: Mapping[str, Tensor],
    name: str,
    tensor: Tensor,
    skip_axis: int | None = None,
) -> Tensor:
    """Apply every permutation that acts on ``tensor``, except on ``skip_axis``."""
    for axis, perm_name in spec.tensor_axes.get(name, {}).items():
        if axis == skip_axis or perm_name not in perms:
            continue
        tensor = tensor.index_select(axis, perms[perm_name].to(tensor.device))
    return tensor


def match_weights(
    spec: PermutationSpec,
    local: Mapping[str, Tensor],
    incoming: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Find the hidden-unit permutations that align ``incoming`` with ``local``.

    Returns one int64 index tensor per permutation in ``spec``. For every
    (t, axis) pair of a permutation ``perm``,
    ``incoming[t].index_select(axis, perm)`` lines up with ``local[t]``.
    `apply_permutations` performs that indexing.
    Each permutation maximises the summed inner product of the local and
    permuted incoming weights, with the other permutations held fixed, by
    solving a linear assignment problem. Sweeps over the permutations in
    sorted name order repeat until none improves, so the result is
    deterministic. A permutation whose tensors are not all in both inputs
    stays the identity.
    """
    problems = check_compatible(local, incoming)
    if problems:
        raise ValueError("incoming tensors do not fit the local model: " + "; ".join(problems))

    perms: dict[str, Tensor] = {}
    sizes: dict[str, int] = {}
    solvable: list[str] = []
    for perm_name in sorted(spec.axes):
        pairs = spec.axes[perm_name]
        first_name, first_axis = pairs[0]
        if first_name not in local:
            raise ValueError(
                f"permutation {perm_name!r} names tensor {first_name!r}, which the local model lacks"
            )
        size = local[first_name].shape[first_axis]
        for tensor_name, axis in pairs:
            if tensor_name in local and local[tensor_name].shape[axis] != size:
                raise ValueError(
                    f"permutation {perm_name!r} has size {size} from {first_name!r} but axis {axis} "
                    f"of {tensor_name!r} has size {local[tensor_name].shape[axis]}; fix the spec"
                )
        sizes[perm_name] = size
        perms[perm_name] = torch.arange(size)
        if all(tensor_name in incoming and tensor_name in local for tensor_name, _ in pairs):
            solvable.append(perm_name)

    # Work in float64 on the CPU: the matrices are hidden-size squared, and
    # double precision keeps exact ties rare and the result reproducible.
    local64 = {name: local[name].detach().to("cpu", torch.float64) for name in incoming}
    incoming64 = {
        name: tensor.detach().to("cpu", torch.float64) for name, tensor in incoming.items()
    }

    for _ in range(MAX_MATCHING_SWEEPS):
        improved = False
        for perm_name in solvable:
            size = sizes[perm_name]
            similarity = torch.zeros(size, size, dtype=torch.float64)  # (local unit, incoming unit)
            for tensor_name, axis in spec.axes[perm_name]:
                mine = local64[tensor_name].movedim(axis, 0).reshape(size, -1)  # (size, rest)
                theirs = _permuted(
                    spec, perms, tensor_name, incoming64[tensor_name], skip_axis=axis
                )
                theirs = theirs.movedim(axis, 0).reshape(size, -1)  # (size, rest)
                similarity += mine @ theirs.T
            rows, columns = linear_sum_assignment(similarity.numpy(), maximize=True)
            new_perm = torch.as_tensor(columns[np.argsort(rows)], dtype=torch.int64)
            rows_all = torch.arange(size)
            old_score = float(similarity[rows_all, perms[perm_name]].sum())
            new_score = float(similarity[rows_all, new_perm].sum())
            # A relative margin keeps rounding noise from counting as progress.
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[perm_name] = new_perm
                improved = True
        if not improved:
            break
    return perms


def apply_permutations(
    spec: PermutationSpec,
    perms: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Permute the hidden units of ``params`` as `match_weights` found.

    Tensors that no permutation in ``perms`` acts on are returned unchanged.
    """
    return {name: _permuted(spec, perms, name, tensor) for name, tensor in params.items()}
