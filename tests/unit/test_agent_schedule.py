"""When the market agent offers and trades."""

from __future__ import annotations

from types import SimpleNamespace

from node.agent import MarketAgent
from node.config import Config


def agent(**settings: object) -> MarketAgent:
    config = Config()
    for key, value in settings.items():
        setattr(config.agent, key, value)
    ledger = SimpleNamespace(totals=lambda: (0, 0))
    node = SimpleNamespace(config=config, trades=SimpleNamespace(ledger=ledger))
    return MarketAgent(node)  # type: ignore[arg-type]


def test_trades_every_round_by_default() -> None:
    assert [agent().trades_in(r) for r in range(3)] == [True, True, True]


def test_trade_frequency_and_start() -> None:
    every_three = agent(trade_every=3, trade_start_round=2)
    assert [r for r in range(12) if every_three.trades_in(r)] == [2, 5, 8, 11]


def test_no_buying_when_disabled() -> None:
    assert not agent(buy=False).trades_in(0)


def test_offer_schedule() -> None:
    seller = agent(offer_start_round=1, offer_every=2)
    assert [r for r in range(7) if seller.offers_in(r)] == [1, 3, 5]


def test_offer_only_after_improvement() -> None:
    seller = agent(offer_on_improvement=True)
    seller.improved = False
    assert not seller.offers_in(0)
    seller.improved = True
    assert seller.offers_in(0)


def test_budget_from_config() -> None:
    limited = agent(round_budget=50)
    assert limited.budget.per_round == 50
    assert limited.budget.total == Config().market.budget
    assert agent().budget.per_round is None
