"""Tests for node.merge: compatibility checks, interpolation and the alpha search."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor

from node.merge import DEFAULT_ALPHAS, check_compatible, check_finite, interpolate, search_merge

# float32 arithmetic on values of order 1: a few units in the last place.
RTOL = 1e-6
ATOL = 1e-7


@dataclass(frozen=True)
class FakeMetrics:
    loss: float
    accuracy: float


def test_default_alphas_grid() -> None:
    expected = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
    assert list(DEFAULT_ALPHAS) == pytest.approx(expected, abs=1e-12)


def test_interpolate_hand_computed() -> None:
    local = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -1.0])}
    incoming = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([1.5, 3.0])}

    merged = interpolate(local, incoming, 0.25)

    # 0.75 * local + 0.25 * incoming, worked out by hand.
    torch.testing.assert_close(
        merged["w"], torch.tensor([[2.0, 3.0], [4.0, 5.0]]), rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(merged["b"], torch.tensor([0.75, 0.0]), rtol=RTOL, atol=ATOL)


def test_interpolate_endpoints() -> None:
    local = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(1))}
    incoming = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(2))}

    assert torch.equal(interpolate(local, incoming, 0.0)["w"], local["w"])
    assert torch.equal(interpolate(local, incoming, 1.0)["w"], incoming["w"])


def test_interpolate_subset_only() -> None:
    local = {"w": torch.ones(2, 2), "b": torch.full((2,), 3.0)}
    incoming = {"w": torch.zeros(2, 2)}

    merged = interpolate(local, incoming, 0.5)

    torch.testing.assert_close(merged["w"], torch.full((2, 2), 0.5), rtol=RTOL, atol=ATOL)
    assert torch.equal(merged["b"], local["b"])
    assert set(merged) == {"w", "b"}


def test_interpolate_integer_buffer_from_local() -> None:
    local = {"w": torch.ones(2), "steps": torch.tensor(7)}
    incoming = {"w": torch.zeros(2), "steps": torch.tensor(100)}

    merged = interpolate(local, incoming, 0.5)

    assert merged["steps"].item() == 7
    assert merged["steps"].dtype == torch.int64


def test_interpolate_leaves_inputs_unchanged() -> None:
    local = {"w": torch.ones(3)}
    incoming = {"w": torch.zeros(3)}

    interpolate(local, incoming, 0.5)

    assert torch.equal(local["w"], torch.ones(3))
    assert torch.equal(incoming["w"], torch.zeros(3))


def test_interpolate_writes_into_out_buffers() -> None:
    local = {"w": torch.ones(4), "b": torch.zeros(2), "steps": torch.tensor(3)}
    incoming = {"w": torch.zeros(4), "b": torch.ones(2)}
    first = interpolate(local, incoming, 0.25)

    second = interpolate(local, incoming, 0.75, out=first)

    for name in local:
        assert second[name].data_ptr() == first[name].data_ptr()
    torch.testing.assert_close(second["w"], torch.full((4,), 0.25), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(second["b"], torch.full((2,), 0.75), rtol=RTOL, atol=ATOL)
    assert second["steps"].item() == 3


def test_interpolate_ignores_out_of_wrong_shape() -> None:
    local = {"w": torch.ones(4)}
    incoming = {"w": torch.zeros(4)}
    wrong = {"w": torch.empty(5)}

    merged = interpolate(local, incoming, 0.5, out=wrong)

    assert merged["w"].shape == (4,)
    assert merged["w"].data_ptr() != wrong["w"].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpolate_half_precision_rounds_once(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    local = {"w": torch.randn(1000, generator=generator).to(dtype)}
    incoming = {"w": torch.randn(1000, generator=generator).to(dtype)}

    merged = interpolate(local, incoming, 0.35)

    # Mixed in float32, rounded to the local dtype only at the end.
    expected = torch.lerp(local["w"].float(), incoming["w"].float(), 0.35).to(dtype)
    assert merged["w"].dtype == dtype
    assert torch.equal(merged["w"], expected)


def test_search_merge_result_survives_later_alphas() -> None:
    local = {"w": torch.zeros(3)}
    incoming = {"w": torch.ones(3)}

    # The loss is lowest at alpha 0.35; later alphas reuse the losing buffers.
    result = search_merge(local, incoming, lambda params: FakeMetrics(loss=abs(float(params["w"][0]) - 0.35), accuracy=0.0))

    assert result.alpha == 0.35
    torch.testing.assert_close(result.params["w"], torch.full((3,), 0.35), rtol=RTOL, atol=ATOL)


def test_interpolate_rejects_alpha_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"alpha is 1\.5"):
        interpolate({"w": torch.ones(1)}, {"w": torch.ones(1)}, 1.5)


def test_interpolate_rejects_incompatible() -> None:
    with pytest.raises(ValueError, match="shape"):
        interpolate({"w": torch.ones(2)}, {"w": torch.ones(3)}, 0.5)


def test_check_compatible_lists_every_problem() -> None:
    local = {
        "a": torch.zeros(2, 3),
        "b": torch.zeros(4),
        "c": torch.zeros((), dtype=torch.int64),
    }
    incoming = {
        "a": torch.zeros(2, 3, dtype=torch.float64),
        "b": torch.zeros(5),
        "d": torch.zeros(1),
    }

    problems = check_compatible(local, incoming)

    assert len(problems) == 3
    assert any(
        p.startswith("a:") and "torch.float64" in p and "torch.float32" in p for p in problems
    )
    assert any(p.startswith("b:") and "(5,)" in p and "(4,)" in p for p in problems)
    assert any(p.startswith("d:") and "unknown" in p for p in problems)


def test_check_compatible_allows_subset() -> None:
    local = {"a": torch.zeros(2), "b": torch.zeros(3)}

    assert check_compatible(local, {"b": torch.ones(3)}) == []


def test_check_compatible_rejects_empty() -> None:
    problems = check_compatible({"a": torch.zeros(2)}, {})

    assert len(problems) == 1


def test_check_finite_names_nan_and_inf() -> None:
    tensors = {
        "ok": torch.ones(3),
        "has_nan": torch.tensor([float("nan"), 1.0, float("nan")]),
        "has_inf": torch.tensor([float("inf"), -float("inf"), 0.0, 2.0]),
        "integers": torch.tensor([1, 2]),
    }

    problems = check_finite(tensors)

    assert len(problems) == 2
    assert any(p.startswith("has_nan:") and "2 NaN" in p for p in problems)
    assert any(p.startswith("has_inf:") and "2 Inf" in p for p in problems)


def test_check_finite_clean() -> None:
    assert check_finite({"w": torch.zeros(4), "b": torch.ones(2)}) == []


def _quadratic_evaluator(
    target: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Callable[[Mapping[str, Tensor]], FakeMetrics]]:
    """Local w=0, incoming w=1, so a merge at alpha has w=alpha; loss is (w - target)^2 + 0.1."""
    local = {"w": torch.tensor([0.0], dtype=torch.float64)}
    incoming = {"w": torch.tensor([1.0], dtype=torch.float64)}

    def evaluate(params: Mapping[str, Tensor]) -> FakeMetrics:
        w = float(params["w"][0])
        return FakeMetrics(loss=(w - target) ** 2 + 0.1, accuracy=1.0 - abs(w - target))

    return local, incoming, evaluate


def test_search_merge_picks_grid_minimum() -> None:
    local, incoming, evaluate = _quadratic_evaluator(target=0.32)

    result = search_merge(local, incoming, evaluate)

    assert result.alpha == 0.35
    assert result.loss_after == min(result.losses.values())
    assert result.loss_before == pytest.approx(0.32**2 + 0.1, rel=1e-12)
    assert result.loss_after == pytest.approx(0.03**2 + 0.1, rel=1e-12)
    assert result.gain == pytest.approx((0.2024 - 0.1009) / 0.2024, rel=1e-9)
    assert float(result.params["w"][0]) == pytest.approx(0.35, rel=1e-12)


def test_search_merge_no_gain_when_worse() -> None:
    local, incoming, evaluate = _quadratic_evaluator(target=-0.5)

    result = search_merge(local, incoming, evaluate)

    assert result.gain < 0
    assert not result.improved
    assert result.alpha == 0.05


def test_search_merge_ties_pick_smallest_alpha() -> None:
    local = {"w": torch.zeros(1)}
    incoming = {"w": torch.ones(1)}

    result = search_merge(local, incoming, lambda params: FakeMetrics(loss=0.5, accuracy=0.5))

    assert result.alpha == DEFAULT_ALPHAS[0]
    assert result.gain == 0.0


def test_search_merge_gain_implies_lower_loss() -> None:
    rng = np.random.default_rng(0)
    local = {"w": torch.zeros(1, dtype=torch.float64)}
    incoming = {"w": torch.ones(1, dtype=torch.float64)}
    for _ in range(200):
        # A random loss for the local model and for each grid point.
        table = {round(alpha, 2): float(rng.uniform(0.1, 2.0)) for alpha in (0.0, *DEFAULT_ALPHAS)}

        def evaluate(
            params: Mapping[str, Tensor], table: dict[float, float] = table
        ) -> FakeMetrics:
            return FakeMetrics(loss=table[round(float(params["w"][0]), 2)], accuracy=0.0)

        result = search_merge(local, incoming, evaluate)

        assert result.loss_after == min(table[alpha] for alpha in DEFAULT_ALPHAS)
        if result.gain > 0:
            assert result.loss_after < result.loss_before
        else:
            assert result.loss_after >= result.loss_before
