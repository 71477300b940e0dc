"""The deal state machine, for both roles, over every (state, event) pair."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.deal import (
    EXPIRING,
    TABLES,
    TERMINAL,
    Deal,
    DealEvent,
    DealState,
    InvalidTransition,
    step,
)
from protocol.messages import Role

E, S = DealEvent, DealState
EXPIRES = 10_000


@given(
    role=st.sampled_from(list(Role)),
    state=st.sampled_from(list(DealState)),
    event=st.sampled_from(list(DealEvent)),
    now=st.integers(0, 2 * EXPIRES),
)
def test_every_pair_gives_state_or_defined_error(role: Role, state: DealState, event: DealEvent, now: int) -> None:
    try:
        result = step(role, state, event, now_ms=now, expires_ms=EXPIRES)
    except InvalidTransition as exc:
        assert exc.state is state
        assert exc.event is event
        assert (state in TERMINAL) or (state, event) not in TABLES[role]
        return
    assert isinstance(result, DealState)
    if state in EXPIRING[role] and now >= EXPIRES:
        assert result is S.EXPIRED
    elif event is E.TIMEOUT:
        assert result is state
    else:
        assert result is TABLES[role][(state, event)]


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", sorted(TERMINAL, key=lambda s: s.value))
def test_terminal_states_take_no_events(role: Role, state: DealState) -> None:
    for event in DealEvent:
        with pytest.raises(InvalidTransition):
            step(role, state, event, now_ms=0, expires_ms=EXPIRES)


def test_table_targets_are_states() -> None:
    for table in TABLES.values():
        for (state, _), target in table.items():
            assert state not in TERMINAL
            assert isinstance(target, DealState)


def run(role: Role, events: list[DealEvent], now: int = 0) -> DealState:
    deal = Deal(role, expires_ms=EXPIRES)
    for event in events:
        deal.apply(event, now)
    return deal.state


def test_buyer_paid_path() -> None:
    events = [E.COUNTER, E.BID, E.ACCEPT, E.TRANSFER_STARTED, E.TRANSFER_DONE, E.SIGN_PAID, E.COUNTERSIGNED]
    assert run(Role.BUYER, events) is S.PAID


def test_buyer_refusal_path() -> None:
    events = [E.ACCEPT, E.TRANSFER_STARTED, E.TRANSFER_DONE, E.SIGN_REFUSAL, E.COUNTERSIGNED]
    assert run(Role.BUYER, events) is S.REFUSED


def test_buyer_failed_transfer() -> None:
    assert run(Role.BUYER, [E.ACCEPT, E.TRANSFER_STARTED, E.TRANSFER_FAILED]) is S.FAILED


def test_seller_paid_path() -> None:
    events = [E.COUNTER, E.BID, E.ACCEPT, E.TRANSFER_STARTED, E.TRANSFER_DONE, E.SIGN_PAID]
    assert run(Role.SELLER, events) is S.PAID


def test_seller_resumed_transfer() -> None:
    events = [E.ACCEPT, E.TRANSFER_STARTED, E.TRANSFER_FAILED, E.TRANSFER_STARTED, E.TRANSFER_DONE]
    assert run(Role.SELLER, events) is S.DELIVERED


def test_rejected_negotiation() -> None:
    assert run(Role.BUYER, [E.COUNTER, E.REJECT]) is S.REJECTED
    assert run(Role.SELLER, [E.REJECT]) is S.REJECTED


def test_buyer_cannot_pay_before_delivery() -> None:
    with pytest.raises(InvalidTransition):
        run(Role.BUYER, [E.ACCEPT, E.SIGN_PAID])


def test_expiry_wins_during_transfer() -> None:
    deal = Deal(Role.BUYER, expires_ms=EXPIRES)
    deal.apply(E.ACCEPT, 0)
    deal.apply(E.TRANSFER_STARTED, 0)
    assert deal.apply(E.TRANSFER_DONE, EXPIRES) is S.EXPIRED
    assert deal.terminal


def test_evaluating_buyer_does_not_expire() -> None:
    deal = Deal(Role.BUYER, expires_ms=EXPIRES)
    for event in [E.ACCEPT, E.TRANSFER_STARTED, E.TRANSFER_DONE]:
        deal.apply(event, 0)
    assert deal.apply(E.TIMEOUT, EXPIRES * 5) is S.EVALUATING
    assert deal.apply(E.SIGN_PAID, EXPIRES * 5) is S.SETTLING_PAID


def test_timeout_before_expiry_keeps_state() -> None:
    deal = Deal(Role.SELLER, expires_ms=EXPIRES)
    assert deal.apply(E.TIMEOUT, EXPIRES - 1) is S.PROPOSED
    assert deal.apply(E.TIMEOUT, EXPIRES) is S.EXPIRED
