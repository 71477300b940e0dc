"""The market agent driving real nodes: train, offer, value, buy within budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from protocol.deal import DealState
from tests.integration.helpers import start_trading_node, trading_config, wait_for_offer, wait_until

pytestmark = pytest.mark.network


async def two_agents(nursery: trio.Nursery, root: Path, *, seller_settings: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    seller_config = trading_config(index=0)
    seller_config.market.reserve_fraction = 0.5
    for key, value in (seller_settings or {}).items():
        setattr(seller_config.agent, key, value)
    seller = await start_trading_node(nursery, root, "seller", index=0, config=seller_config)
    buyer = await start_trading_node(nursery, root, "buyer", index=1)
    await buyer.connect(seller.addrs()[0])
    await wait_until(lambda: len(buyer.gossip.pubsub.peers) == 1, what="pubsub between the pair")
    await trio.sleep(1.2)
    return seller, buyer


async def test_agent_round_buys_and_merges(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await two_agents(nursery, tmp_path)
    offered = await seller.agent.prepare(0)
    assert offered.offer_id is not None
    assert offered.ask == seller.config.agent.price
    await buyer.agent.prepare(0)
    await wait_for_offer(buyer, bytes.fromhex(offered.offer_id))
    valid = buyer.gossip.book.get(bytes.fromhex(offered.offer_id))
    assert valid is not None
    # The offer claims the seller's validation metrics.
    assert valid.offer.metric("val_loss") is not None

    report = await buyer.agent.trade(0)
    assert len(report.purchases) == 1
    purchase = report.purchases[0]
    assert purchase["state"] == "paid"
    assert purchase["price"] <= purchase["bid"]
    assert buyer.agent.budget.spent == purchase["price"]
    assert buyer.models.latest("model").source == "merge"
    _, spent = buyer.trades.ledger.totals()
    assert spent == purchase["price"]

    # The same offer is not bought twice.
    again = await buyer.agent.trade(1)
    assert again.purchases == []


async def test_agent_budget_covers_competitor_premium(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await two_agents(nursery, tmp_path)
    seller.config.agent.competitors = [buyer.peer_id_text]
    seller.config.agent.competitor_policy = "premium"
    # The buyer values gains highly enough to pay the premium.
    buyer.config.agent.value_per_gain = 10_000.0
    offered = await seller.agent.prepare(0)
    await buyer.agent.prepare(0)
    await wait_for_offer(buyer, bytes.fromhex(offered.offer_id or ""))

    report = await buyer.agent.trade(0)
    assert len(report.purchases) == 1
    purchase = report.purchases[0]
    assert purchase["state"] == "paid"
    # A competitor pays more than the public ask, and the budget knows it.
    assert purchase["price"] > purchase["ask"]
    assert buyer.agent.budget.spent == purchase["price"]
    deal = buyer.trades.deals.get(bytes.fromhex(purchase["deal_id"]))
    assert deal is not None
    assert deal.state is DealState.PAID


async def test_agent_respects_round_budget(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await two_agents(nursery, tmp_path)
    buyer.agent.budget.per_round = 5  # below the seller's reserve of 10
    offered = await seller.agent.prepare(0)
    await buyer.agent.prepare(0)
    await wait_for_offer(buyer, bytes.fromhex(offered.offer_id or ""))
    report = await buyer.agent.trade(0)
    assert all(p["state"] == "rejected" for p in report.purchases)
    assert all(p["bid"] <= 5 for p in report.purchases)
    assert buyer.agent.budget.spent == 0
