"""Valuation, budgets, asks and selling rules of the market agent, as pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.pricing import (
    AskPolicy,
    Budget,
    Candidate,
    ask_price,
    choose_purchases,
    claimed_gain,
    competitor_terms,
    expected_gain,
    may_sell,
    offer_value,
)


def test_claimed_gain_compares_losses() -> None:
    assert claimed_gain(0.5, 400_000) == pytest.approx(0.2)
    assert claimed_gain(0.5, 600_000) == 0.0
    assert claimed_gain(None, 400_000) is None
    assert claimed_gain(0.5, None) is None


def test_expected_gain_without_history_uses_claim_and_prior() -> None:
    assert expected_gain(claimed=None, history=[], prior=0.05) == pytest.approx(0.05)
    assert expected_gain(claimed=0.15, history=[], prior=0.05) == pytest.approx(0.10)


def test_expected_gain_moves_to_history() -> None:
    few = expected_gain(claimed=None, history=[0.3], prior=0.0)
    many = expected_gain(claimed=None, history=[0.3] * 20, prior=0.0)
    assert 0.0 < few < many < 0.3
    assert many == pytest.approx(0.3 * 20 / 22)


def test_expected_gain_weighs_recent_purchases_more() -> None:
    rising = expected_gain(claimed=None, history=[0.0, 0.0, 0.4], prior=0.1)
    falling = expected_gain(claimed=None, history=[0.4, 0.0, 0.0], prior=0.1)
    assert rising > falling


def test_negative_gains_count_as_zero() -> None:
    assert expected_gain(claimed=None, history=[-0.5, -0.5], prior=0.0) == 0.0


@given(
    claimed=st.none() | st.floats(0, 1),
    history=st.lists(st.floats(-1, 1), max_size=20),
    prior=st.floats(0, 1),
)
def test_expected_gain_bounded(claimed: float | None, history: list[float], prior: float) -> None:
    values = [prior, *([] if claimed is None else [claimed]), *[max(0.0, g) for g in history]]
    gain = expected_gain(claimed=claimed, history=history, prior=prior)
    assert min(values) - 1e-12 <= gain <= max(values) + 1e-12


def test_offer_value() -> None:
    assert offer_value(0.05, 1000) == 50
    assert offer_value(-0.1, 1000) == 0


def test_choose_by_value_per_price() -> None:
    budget = Budget(total=100)
    candidates = [
        Candidate(b"a", ask=50, value=60),  # 1.2 per unit
        Candidate(b"b", ask=10, value=40),  # 4.0
        Candidate(b"c", ask=20, value=50),  # 2.5
        Candidate(b"d", ask=5, value=0),  # worthless
    ]
    chosen = choose_purchases(candidates, budget)
    assert [c.key for c in chosen] == [b"b", b"c", b"a"]


def test_choose_skips_what_no_longer_fits() -> None:
    budget = Budget(total=60)
    candidates = [Candidate(b"a", ask=50, value=500), Candidate(b"b", ask=30, value=200), Candidate(b"c", ask=10, value=50)]
    chosen = choose_purchases(candidates, budget)
    assert [c.key for c in chosen] == [b"a", b"c"]


def test_choose_respects_count() -> None:
    candidates = [Candidate(bytes([i]), ask=1, value=10) for i in range(5)]
    assert len(choose_purchases(candidates, Budget(total=100), max_count=2)) == 2


def test_most_it_costs_is_ask_or_value() -> None:
    assert Candidate(b"a", ask=50, value=30).most_it_costs == 30
    assert Candidate(b"a", ask=50, value=80).most_it_costs == 50


operations = st.lists(
    st.tuples(st.sampled_from(["charge", "refund", "round"]), st.integers(0, 200)), max_size=60
)


@given(total=st.integers(0, 1000), per_round=st.none() | st.integers(0, 300), steps=operations)
def test_budget_never_exceeded(total: int, per_round: int | None, steps: list[tuple[str, int]]) -> None:
    budget = Budget(total=total, per_round=per_round)
    for action, amount in steps:
        if action == "charge":
            if budget.fits(amount):
                budget.charge(amount)
            else:
                with pytest.raises(LocalProtocolError):
                    budget.charge(amount)
        elif action == "refund" and amount <= budget.spent_this_round:
            budget.refund(amount)
        elif action == "round":
            budget.new_round()
        assert 0 <= budget.spent <= total
        if per_round is not None:
            assert budget.spent_this_round <= per_round


@given(
    candidates=st.lists(
        st.builds(Candidate, key=st.binary(min_size=1, max_size=4), ask=st.integers(0, 500), value=st.integers(0, 500)),
        max_size=20,
    ),
    total=st.integers(0, 2000),
    spent=st.integers(0, 2000),
)
def test_chosen_purchases_fit_budget(candidates: list[Candidate], total: int, spent: int) -> None:
    budget = Budget(total=max(total, spent), spent=spent)
    chosen = choose_purchases(candidates, budget)
    assert sum(c.most_it_costs for c in chosen) <= budget.available()
    for candidate in chosen:
        budget.charge(candidate.most_it_costs)
    assert budget.spent <= budget.total


def test_fixed_ask() -> None:
    assert ask_price(AskPolicy.FIXED, base=20) == 20


def test_cost_ask() -> None:
    assert ask_price(AskPolicy.COST, base=20, total_bytes=2**20 * 3, cost_per_mib=10, margin=0.5) == 45
    assert ask_price(AskPolicy.COST, base=20, total_bytes=100, cost_per_mib=10, minimum=2) == 2


def test_adaptive_ask() -> None:
    assert ask_price(AskPolicy.ADAPTIVE, base=20, previous=20, sold=2, step=0.25) == 25
    assert ask_price(AskPolicy.ADAPTIVE, base=20, previous=20, sold=0, step=0.25) == 15
    assert ask_price(AskPolicy.ADAPTIVE, base=20, previous=2, sold=0, step=0.5, minimum=2) == 2
    assert ask_price(AskPolicy.ADAPTIVE, base=20, previous=90, sold=1, step=0.5, maximum=100) == 100


def test_competitor_pays_for_its_gain() -> None:
    assert competitor_terms(ask=20, reserve=10, buyer_gain=0.05, value_per_gain=1000) == (70, 60)


def test_may_sell_refusals() -> None:
    assert may_sell(owed=0, outstanding=0, price=10, credit_limit=100, refusals=3, max_refusals=3) is not None
    assert may_sell(owed=0, outstanding=0, price=10, credit_limit=100, refusals=3, max_refusals=None) is None


@given(owed=st.integers(-1000, 1000), outstanding=st.integers(0, 1000), price=st.integers(0, 1000), limit=st.integers(0, 2000))
def test_never_sells_over_credit_limit(owed: int, outstanding: int, price: int, limit: int) -> None:
    verdict = may_sell(owed=owed, outstanding=outstanding, price=price, credit_limit=limit, refusals=0, max_refusals=None)
    if verdict is None:
        assert owed + outstanding + price <= limit
    else:
        assert owed + outstanding + price > limit
