"""What a purchase stores and reports: the local model it merges into, the
name of weights bought outright, and a gain that was never measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import trio

from node.client import ControlClient, ControlError
from node.daemon import Node
from node.publish import OfferRequest
from node.tasks.digits import DigitsTask
from protocol.deal import DealState
from protocol.messages import Outcome
from protocol.offers import ValidOffer
from tests.integration.helpers import start_trading_node, trading_config, wait_for_offer, wait_until
from tests.integration.test_trade import buy_and_wait, offer_model, pair

pytestmark = pytest.mark.network


async def call(node: Node, method: str, path: str, body: Any = None) -> Any:
    """One control API request over the node's Unix socket, as the CLI makes it."""
    client = ControlClient(node.data_dir)
    return await trio.to_thread.run_sync(lambda: client.request(method, path, json=body))


async def api_error(node: Node, method: str, path: str, body: Any = None) -> ControlError:
    with pytest.raises(ControlError) as error:
        await call(node, method, path, body)
    return error.value


async def import_file(node: Node, path: Path, name: str, task: str = "") -> None:
    await trio.to_thread.run_sync(lambda: node.models.import_file(path, name=name, task=task, now_ms=node.now_ms()))


async def offer_again(seller: Node, buyer: Node) -> ValidOffer:
    """Publish the seller's mlp once more, a new offer: a node buys each offer once."""
    published = await seller.publish(OfferRequest(model="mlp", price=100))
    await wait_for_offer(buyer, published.offer_id)
    valid = buyer.gossip.book.get(published.offer_id)
    assert valid is not None
    return valid


async def test_copy_without_task_keeps_merge(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    await buyer.init_model("mlp", epochs=3)
    valid = await offer_model(seller, buyer)
    first = await buy_and_wait(buyer, valid)
    merged = buyer.trades.deals.get(first)
    assert merged is not None
    assert (merged.state, merged.model, merged.model_version) == (DealState.PAID, "mlp", 3)

    # The buyer imports the seller's weights without a task: the newest
    # model of the family now has no task.
    exported = tmp_path / "alice-mlp-2.safetensors"
    await trio.to_thread.run_sync(lambda: seller.models.export("mlp@2", exported))
    await import_file(buyer, exported, "copy")

    second = await buy_and_wait(buyer, await offer_again(seller, buyer))

    # The buyer tried the weights against its trained mlp@3, so it measured
    # a gain. It merged them into mlp, or kept mlp@3 when the gain was too small.
    record = buyer.trades.deals.get(second)
    assert record is not None
    assert record.state is DealState.PAID
    assert record.gain_ppm is not None
    stored = [(v.ref, v.source, v.parent) for v in buyer.models.list() if v.deal_id == second]
    assert stored in ([], [("mlp@4", "merge", 3)])
    assert record.model == ("mlp" if stored else "")
    assert [v.ref for v in buyer.models.list() if v.name == "copy"] == ["copy@1"]
    assert not [v for v in buyer.models.list() if v.source == "purchase"]
    view = await call(buyer, "GET", f"/v1/deals/{second.hex()[:12]}")
    assert view["gain_ppm"] == record.gain_ppm


async def test_outright_purchase_name_and_gain(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller = await start_trading_node(nursery, tmp_path, "seller", index=0)
    config = trading_config(index=1)
    config.task.name = ""  # no task and no validation data: every purchase is outright
    buyer = await start_trading_node(nursery, tmp_path, "buyer", index=1, config=config)
    await buyer.connect(seller.addrs()[0])
    await wait_until(lambda: len(buyer.gossip.pubsub.peers) == 1, what="pubsub between the pair")
    await trio.sleep(1.2)
    # The buyer's own model of the same family, named like the seller's.
    own_file = tmp_path / "own.safetensors"
    safetensors.torch.save_file(DigitsTask().initial_params(5), str(own_file))
    await import_file(buyer, own_file, "mlp")
    own = buyer.models.get("mlp")

    valid = await offer_model(seller, buyer)
    assert valid.offer.family == own.family
    first = await buy_and_wait(buyer, valid)

    record = buyer.trades.deals.get(first)
    assert record is not None
    assert record.state is DealState.PAID
    expected_name = f"mlp-{seller.peer_id_text[-6:]}"
    assert (record.model, record.model_version) == (expected_name, 1)
    bought = buyer.models.get(expected_name)
    assert bought.source == "purchase"
    assert bought.root == seller.models.get("mlp@2").root
    assert buyer.models.get("mlp") == own  # still version 1, the buyer's own

    # No gain was measured: the deal records None, and the signed receipt 0.
    assert record.gain_ppm is None
    assert record.accuracy_delta_ppm is None
    assert record.receipt is not None
    assert record.receipt.outcome == Outcome.PAID
    assert record.receipt.gain_ppm == 0
    view = await call(buyer, "GET", f"/v1/deals/{first.hex()}")
    assert view["gain_ppm"] is None
    assert view["accuracy_delta_ppm"] is None
    assert view["model"] == f"{expected_name}@1"
    ledger = await call(buyer, "GET", "/v1/ledger")
    [entry] = ledger["entries"]
    assert (entry["deal_id"], entry["gain_ppm"], entry["accuracy_delta_ppm"]) == (first.hex(), None, None)
    assert entry["amount"] == 100

    # Buying from the same seller again adds a version to its purchases.
    second = await buy_and_wait(buyer, await offer_again(seller, buyer))
    again = buyer.trades.deals.get(second)
    assert again is not None
    assert (again.model, again.model_version) == (expected_name, 2)
    assert buyer.models.get("mlp") == own


async def test_bid_below_price_names_the_ask(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path, pricing="fixed")
    valid = await offer_model(seller, buyer, price=100)

    error = await api_error(buyer, "POST", "/v1/buy", {"offer": valid.offer_id.hex()[:16], "max_price": 50})

    assert error.status == 409
    assert str(error) == (
        "the seller rejected the bid of 50: the bid is below this seller's price; "
        "the offer asks 100, so raise --max-price (up to 100) to buy"
    )
    assert buyer.trades.deals.list() == []


async def test_errors_are_json_over_the_socket(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    valid = await offer_model(seller, buyer)
    deal_id = await buy_and_wait(buyer, valid)

    unknown = await api_error(buyer, "GET", "/v1/nope")
    assert unknown.status == 404
    assert str(unknown) == (
        'the control API has no route GET /v1/nope; the routes are listed under "The control API" in README.md'
    )
    wrong_method = await api_error(buyer, "DELETE", "/v1/deals")
    assert wrong_method.status == 405
    assert str(wrong_method).startswith("method DELETE is not allowed for /v1/deals, only GET;")

    missing = await api_error(buyer, "GET", "/v1/deals/zzz")
    assert missing.status == 404
    assert "no deal matches 'zzz'" in str(missing)
    assert "`pmarket deals`" in str(missing)
    # A prefix that is hex but matches no deal: flip the first digit.
    other = format(int(deal_id.hex()[0], 16) ^ 1, "x")
    assert (await api_error(buyer, "GET", f"/v1/deals/{other}")).status == 404
    assert (await call(buyer, "GET", f"/v1/deals/{deal_id.hex()[:8]}"))["deal_id"] == deal_id.hex()

