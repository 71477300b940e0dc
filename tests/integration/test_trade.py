"""A whole trade between two real nodes on loopback, and the ways it goes wrong."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import trio

from node.buyer import BuyError
from node.daemon import Node
from node.publish import OfferRequest
from node.streams import PeerError
from node.trades import TradeHooks, Trades
from protocol.codec import encode
from protocol.deal import DealState
from protocol.errors import Reason
from protocol.messages import (
    UNSIGNED,
    ChunkRequest,
    ErrorMessage,
    Offer,
    Outcome,
    PaymentTerms,
    Receipt,
    sign_offer,
    sign_receipt,
)
from protocol.offers import ValidOffer
from tests.integration.helpers import (
    start_trading_node,
    trading_config,
    wait_for_deal_end,
    wait_for_offer,
    wait_until,
)

pytestmark = pytest.mark.network


async def pair(nursery: trio.Nursery, root: Path, **seller_config: object) -> tuple[Node, Node]:
    config = trading_config(index=0)
    for key, value in seller_config.items():
        setattr(config.market, key, value)
    seller = await start_trading_node(nursery, root, "seller", index=0, config=config)
    buyer = await start_trading_node(nursery, root, "buyer", index=1)
    await buyer.connect(seller.addrs()[0])
    await wait_until(lambda: len(buyer.gossip.pubsub.peers) == 1, what="pubsub between the pair")
    await trio.sleep(1.2)
    return seller, buyer


async def offer_model(seller: Node, buyer: Node, *, price: int = 100, epochs: int = 3, **request: object) -> ValidOffer:
    await seller.init_model("mlp", epochs=epochs)
    published = await seller.publish(OfferRequest(model="mlp", price=price, **request))  # type: ignore[arg-type]
    await wait_for_offer(buyer, published.offer_id)
    valid = buyer.gossip.book.get(published.offer_id)
    assert valid is not None
    return valid


async def buy_and_wait(buyer: Node, valid: ValidOffer, **kwargs: object) -> bytes:
    record = await buyer.trades.buyer.buy(valid, **kwargs)  # type: ignore[arg-type]
    await wait_for_deal_end(buyer, record.deal_id)
    return record.deal_id


def ledger_receipts(node: Node) -> list[bytes]:
    return [encode(entry.receipt) for entry in node.trades.ledger.entries()]


async def test_trade_merges_and_settles(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    await buyer.init_model("mlp", epochs=3)
    before = buyer.models.get("mlp")
    valid = await offer_model(seller, buyer)

    deal_id = await buy_and_wait(buyer, valid)
    bought = buyer.trades.deals.get(deal_id)
    assert bought is not None
    assert bought.state is DealState.PAID
    await wait_for_deal_end(seller, deal_id)
    sold = seller.trades.deals.get(deal_id)
    assert sold is not None
    assert sold.state is DealState.PAID

    # The buyer merged: a new version whose validation loss is no worse.
    after = buyer.models.get("mlp")
    assert after.version == before.version + 1
    assert after.source == "merge"
    assert after.metrics["val_loss"] <= before.metrics["val_loss"]
    assert buyer.status()["models"] == 1
    assert buyer.status()["model_versions"] == after.version
    assert bought.gain_ppm is not None
    assert bought.gain_ppm >= 0

    # Both ledgers hold the same countersigned receipt, and the chains verify.
    assert ledger_receipts(buyer) == ledger_receipts(seller)
    assert len(ledger_receipts(buyer)) == 1
    receipt = buyer.trades.ledger.entries()[0].receipt
    assert receipt.countersigned
    assert receipt.outcome == Outcome.PAID
    assert receipt.amount == 100
    buyer.trades.ledger.verify()
    seller.trades.ledger.verify()
    assert buyer.trades.ledger.balances() == {seller.peer_id: -100}
    assert seller.trades.ledger.balances() == {buyer.peer_id: 100}

    # The buyer timed every phase of the deal.
    phases = buyer.trades.buyer.progress[deal_id].phases
    assert set(phases) == {"negotiate", "transfer", "verify", "sync", "evaluate", "merge", "commit", "receipt"}
    assert all(seconds >= 0 for seconds in phases.values())


async def test_outright_purchase_without_local_model(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    valid = await offer_model(seller, buyer)
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.PAID
    bought = buyer.models.get(record.model)
    assert bought.source == "purchase"
    assert bought.root == seller.models.get("mlp").root


async def test_paid_offer_not_bought_twice(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    valid = await offer_model(seller, buyer)
    deal_id = await buy_and_wait(buyer, valid)

    with pytest.raises(BuyError) as error:
        await buyer.trades.buyer.buy(valid)

    assert "already bought" in str(error.value)
    assert deal_id.hex()[:12] in str(error.value)
    assert len(buyer.trades.deals.list()) == 1
    assert buyer.trades.ledger.balances() == {seller.peer_id: -100}


async def test_nash_split_price(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path, pricing="nash", share=0.5)
    valid = await offer_model(seller, buyer, price=100, reserve=60)
    deal_id = await buy_and_wait(buyer, valid, max_price=90)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    # Reserve 60, buyer value 90, seller share 0.5: 60 + 0.5 * 30.
    assert record.price == 75
    assert buyer.trades.ledger.balances() == {seller.peer_id: -75}


async def test_bid_below_reserve_rejected(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    valid = await offer_model(seller, buyer, price=100, reserve=60)
    with pytest.raises(BuyError) as error:
        await buyer.trades.buyer.buy(valid, max_price=50)
    assert error.value.reason == Reason.PRICE_BELOW_RESERVE
    assert buyer.trades.deals.list() == []
    assert seller.trades.deals.list() == []


async def test_bid_above_own_budget_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    buyer.config.market.budget = 40
    valid = await offer_model(seller, buyer, price=100)
    with pytest.raises(BuyError) as error:
        await buyer.trades.buyer.buy(valid)
    assert error.value.reason == Reason.BUDGET_EXCEEDED
    assert "budget" in str(error.value)
    assert seller.trades.deals.list() == []


async def test_credit_limit_stops_sale(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path, credit_limit=50)
    valid = await offer_model(seller, buyer, price=100)
    with pytest.raises(BuyError) as error:
        await buyer.trades.buyer.buy(valid)
    assert error.value.reason == Reason.CREDIT_LIMIT


class FlipOnce(TradeHooks):
    """A seller that corrupts one chunk the first `times` times it sends it."""

    def __init__(self, index: int, times: int) -> None:
        self.index = index
        self.times = times
        self.sent: list[int] = []

    def outgoing_chunk(self, deal_id: bytes, index: int, data: bytes) -> bytes:
        self.sent.append(index)
        if index == self.index and self.times > 0:
            self.times -= 1
            return bytes([data[0] ^ 0x01]) + data[1:]
        return data


def big_weights(path: Path, megabytes: float = 1.5) -> Path:
    rng = np.random.default_rng(7)
    count = int(megabytes * 2**20 / 4)
    safetensors.numpy.save_file({"blob": rng.standard_normal(count).astype(np.float32)}, str(path))
    return path


async def offer_file(seller: Node, buyer: Node, path: Path, *, name: str = "blob", price: int = 10) -> ValidOffer:
    await trio.to_thread.run_sync(lambda: seller.models.import_file(path, name=name, task="", now_ms=seller.now_ms()))
    published = await seller.publish(OfferRequest(model=name, price=price))
    await wait_for_offer(buyer, published.offer_id)
    valid = buyer.gossip.book.get(published.offer_id)
    assert valid is not None
    return valid


async def test_flipped_chunk_fetched_again(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    hooks = FlipOnce(index=3, times=1)
    seller.trades.hooks = hooks
    valid = await offer_file(seller, buyer, big_weights(tmp_path / "big.safetensors"))
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.PAID
    assert hooks.sent.count(3) == 2
    assert all(hooks.sent.count(i) == 1 for i in set(hooks.sent) - {3})


async def test_seller_reads_chunks_without_memory_map(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node import seller as seller_module

    # As on a kernel that cannot populate a memory map on request.
    monkeypatch.setattr(seller_module, "_map_file", lambda fd, size: None)
    seller, buyer = await pair(nursery, tmp_path)
    valid = await offer_file(seller, buyer, big_weights(tmp_path / "big.safetensors"))
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.PAID
    assert buyer.models.get(record.model).root == seller.models.get("blob").root


async def test_persistently_bad_chunk_fails_deal(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    seller.trades.hooks = FlipOnce(index=2, times=100)
    valid = await offer_file(seller, buyer, big_weights(tmp_path / "big.safetensors"))
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.FAILED
    assert record.reason == "chunk_hash_mismatch"
    assert buyer.trades.ledger.entries() == []
    assert seller.trades.ledger.entries() == []
    # The seller keeps running and answering.
    assert seller.status()["peers"] == 1


async def test_manifest_not_matching_root_fails(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    valid = await offer_file(seller, buyer, big_weights(tmp_path / "big.safetensors"))
    # The seller serves another manifest than the one its offer signed.
    published = seller.publisher.get(valid.offer_id)
    assert published is not None
    forged = dataclasses.replace(published.manifest, chunk_hashes=bytes(len(published.manifest.chunk_hashes)))
    seller.db.execute("UPDATE published_offers SET manifest = ? WHERE offer_id = ?", (encode(forged), valid.offer_id))
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.FAILED
    assert record.reason == "manifest_mismatch"
    assert buyer.trades.ledger.entries() == []


class Truncate(TradeHooks):
    """A seller whose first transfer stream breaks halfway through chunk `index`."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.done = False
        self.sent: list[int] = []

    def outgoing_chunk(self, deal_id: bytes, index: int, data: bytes) -> bytes:
        self.sent.append(index)
        return data

    def cut_chunk(self, deal_id: bytes, index: int) -> int | None:
        if index == self.index and not self.done:
            self.done = True
            return 1000
        return None


async def test_truncated_stream_resumes(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    hooks = Truncate(index=5)
    seller.trades.hooks = hooks
    valid = await offer_file(seller, buyer, big_weights(tmp_path / "big.safetensors"))
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.PAID
    # Chunks 0..4 arrived before the break and were not fetched again.
    assert all(hooks.sent.count(i) == 1 for i in range(5))
    assert hooks.sent.count(5) == 2


async def test_chunk_request_from_wrong_peer(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    intruder = await start_trading_node(nursery, tmp_path, "intruder", index=1)
    await intruder.connect(seller.addrs()[0])
    valid = await offer_model(seller, buyer)
    deal_id = await buy_and_wait(buyer, valid)

    io = await intruder.trades.open_stream(seller.peer_id, Trades.TRANSFER)
    await io.send(ChunkRequest(deal_id, True, ((0, 1),)))
    reply = await io.read_message([ErrorMessage], timeout=10)
    assert isinstance(reply, ErrorMessage)
    assert reply.reason == Reason.WRONG_PEER

    io = await intruder.trades.open_stream(seller.peer_id, Trades.TRANSFER)
    await io.send(ChunkRequest(b"\x05" * 32, True, ()))
    reply = await io.read_message([ErrorMessage], timeout=10)
    assert isinstance(reply, ErrorMessage)
    assert reply.reason == Reason.UNKNOWN_DEAL
    assert seller.status()["peers"] == 2


async def publish_forged(seller: Node, buyer: Node, path: Path, family: bytes, task: str) -> ValidOffer:
    """The seller claims `family` for a file whose tensors do not fit it."""
    version = await trio.to_thread.run_sync(lambda: seller.models.import_file(path, name="forged", task="", now_ms=seller.now_ms()))
    published = await seller.publish(OfferRequest(model="forged", price=10))
    offer = sign_offer(dataclasses.replace(published.offer, family=family, task=task, seq=published.offer.seq + 1,
                                           signature=UNSIGNED), seller.identity.signer)
    seller.db.execute(
        "INSERT INTO published_offers SELECT ?, model, version, offer_key, ?, ?, ?, path, manifest, reserve, created_ms, expires_ms "
        "FROM published_offers WHERE offer_id = ?",
        (offer.offer_id, family, offer.seq, encode(offer), published.offer_id),
    )
    del version
    await seller.publish_offer(offer)
    await wait_for_offer(buyer, offer.offer_id)
    valid = buyer.gossip.book.get(offer.offer_id)
    assert valid is not None
    return valid


async def test_wrong_tensors_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    mine = await buyer.init_model("mlp", epochs=1)
    wrong = tmp_path / "wrong.safetensors"
    safetensors.numpy.save_file(
        {"hidden1.weight": np.zeros((64, 64), np.float32), "output.bias": np.zeros(10, np.float64), "extra": np.zeros(3, np.float32)},
        str(wrong),
    )
    valid = await publish_forged(seller, buyer, wrong, mine.family, "digits")
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.REFUSED
    assert record.reason == "tensor_mismatch"
    for name in ("hidden1.weight", "output.bias", "extra"):
        assert name in record.detail
    assert buyer.models.get("mlp").version == mine.version
    entry = buyer.trades.ledger.entries()[0]
    assert entry.receipt.outcome == Outcome.REFUSED
    assert entry.receipt.amount == 0
    assert seller.trades.ledger.balances() == {}


async def test_non_finite_weights_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    mine = await buyer.init_model("mlp", epochs=1)
    tensors = buyer.models.load_tensors(mine)
    poisoned = {name: tensor.numpy().copy() for name, tensor in tensors.items()}
    poisoned["hidden1.bias"][3] = np.nan
    poisoned["output.weight"][0, 0] = np.inf
    path = tmp_path / "poisoned.safetensors"
    safetensors.numpy.save_file(poisoned, str(path))
    valid = await publish_forged(seller, buyer, path, mine.family, "digits")
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.REFUSED
    assert record.reason == "non_finite"
    assert "hidden1.bias" in record.detail
    assert "output.weight" in record.detail
    assert buyer.models.get("mlp").version == mine.version


async def send_receipt(buyer: Node, seller: Node, receipt: Receipt) -> Receipt | ErrorMessage:
    io = await buyer.trades.open_stream(seller.peer_id, Trades.SETTLE)
    await io.send(receipt)
    reply = await io.read_message([Receipt, ErrorMessage], timeout=10)
    await io.close()
    assert isinstance(reply, (Receipt, ErrorMessage))
    return reply


async def test_receipts_checked_and_never_paid_twice(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    valid = await offer_model(seller, buyer)
    deal_id = await buy_and_wait(buyer, valid)
    await wait_for_deal_end(seller, deal_id)
    paid = buyer.trades.ledger.entries()[0].receipt
    signer = buyer.identity.signer

    # The same receipt again: the seller returns its countersignature; nothing new.
    again = await send_receipt(buyer, seller, dataclasses.replace(paid, seller_signature=b""))
    assert again == paid
    assert len(seller.trades.ledger.entries()) == 1

    # Another amount for the same deal: rejected.
    other = sign_receipt(dataclasses.replace(paid, amount=paid.amount + 1), signer)
    reply = await send_receipt(buyer, seller, other)
    assert isinstance(reply, ErrorMessage)
    assert reply.reason == Reason.AMOUNT_MISMATCH

    # A receipt for a deal the seller never made: rejected.
    unknown = sign_receipt(dataclasses.replace(paid, deal_id=b"\x07" * 32), signer)
    reply = await send_receipt(buyer, seller, unknown)
    assert isinstance(reply, ErrorMessage)
    assert reply.reason == Reason.UNKNOWN_DEAL

    assert len(seller.trades.ledger.entries()) == 1
    assert seller.trades.ledger.balances() == {buyer.peer_id: paid.amount}


class Slow(TradeHooks):
    """A seller that records what it sends and takes its time."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def outgoing_chunk(self, deal_id: bytes, index: int, data: bytes) -> bytes:
        self.sent.append(index)
        return data


async def test_buyer_restart_resumes_transfer(nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    hooks = Slow()
    seller.trades.hooks = hooks
    valid = await offer_file(seller, buyer, big_weights(tmp_path / "big.safetensors", megabytes=2))

    # Slow the buyer's verification down so the test can stop it midway.
    from node import buyer as buyer_module

    original = buyer_module.Buyer._verify_and_put

    def slow_verify(self: object, manifest: object, index: int, data: bytes) -> bool:
        import time

        time.sleep(0.05)
        return original(self, manifest, index, data)  # type: ignore[arg-type]

    monkeypatch.setattr(buyer_module.Buyer, "_verify_and_put", slow_verify)
    record = await buyer.trades.buyer.buy(valid)
    await wait_until(lambda: buyer.trades.buyer.progress.get(record.deal_id, None) is not None
                     and buyer.trades.buyer.progress[record.deal_id].chunks_done >= 8, what="eight chunks stored")
    stored_before = buyer.trades.buyer.progress[record.deal_id].chunks_done
    buyer.request_stop()
    await trio.sleep(0.5)
    monkeypatch.setattr(buyer_module.Buyer, "_verify_and_put", original)

    restarted = await start_trading_node(nursery, tmp_path, "buyer", index=1)
    await restarted.connect(seller.addrs()[0])
    await wait_for_deal_end(restarted, record.deal_id)
    final = restarted.trades.deals.get(record.deal_id)
    assert final is not None
    assert final.state is DealState.PAID
    total = final.chunks_total
    # Every chunk stored before the restart was sent once; none was fetched again.
    resent = [i for i in range(total) if hooks.sent.count(i) > 1]
    assert len(resent) <= total - stored_before
    assert all(hooks.sent.count(i) >= 1 for i in range(total))
    assert len(ledger_receipts(restarted)) == 1


async def test_offers_survive_seller_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, _ = await pair(nursery, tmp_path)
    await seller.init_model("mlp", epochs=1)
    first = await seller.publish(OfferRequest(model="mlp", price=100))
    newer = await seller.publish(OfferRequest(model="mlp", price=80))
    seller.request_stop()
    await trio.sleep(0.5)

    restarted = await start_trading_node(nursery, tmp_path, "seller", index=0)

    # Only the newest offer per key comes back; a node that joins now pulls it.
    assert restarted.gossip.book.get(newer.offer_id) is not None
    assert restarted.gossip.book.get(first.offer_id) is None
    late = await start_trading_node(nursery, tmp_path, "late", index=1)
    await late.connect(restarted.addrs()[0])
    await wait_for_offer(late, newer.offer_id)
    valid = late.gossip.book.get(newer.offer_id)
    assert valid is not None
    assert valid.offer.price == 80


async def test_gain_terms_refuse_without_gain(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    await buyer.init_model("mlp", epochs=3)
    mine = buyer.models.get("mlp")
    # The seller offers the buyer's own weights back: no gain is possible.
    path = tmp_path / "same.safetensors"
    await trio.to_thread.run_sync(lambda: buyer.models.export(mine, path))
    await trio.to_thread.run_sync(lambda: seller.models.import_file(path, name="mlp", task="digits", now_ms=seller.now_ms()))
    published = await seller.publish(OfferRequest(model="mlp", price=10, payment=PaymentTerms.GAIN, min_gain_ppm=10_000))
    await wait_for_offer(buyer, published.offer_id)
    valid = buyer.gossip.book.get(published.offer_id)
    assert valid is not None
    deal_id = await buy_and_wait(buyer, valid)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.REFUSED
    assert record.reason == "gain_below_minimum"
    assert buyer.trades.ledger.balances() == {}
    assert isinstance(published.offer, Offer)


async def test_gain_below_terms_not_merged(nursery: trio.Nursery, tmp_path: Path) -> None:
    # The buyer's own [market] min_gain is 0, so the offer's minimum is the stricter one.
    seller, buyer = await pair(nursery, tmp_path)
    await buyer.init_model("mlp", epochs=3)
    before = buyer.models.get("mlp")
    valid = await offer_model(seller, buyer, payment=PaymentTerms.GAIN, min_gain_ppm=990_000)

    deal_id = await buy_and_wait(buyer, valid)

    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    assert record.state is DealState.REFUSED
    assert record.gain_ppm is not None
    assert 0 < record.gain_ppm < 990_000
    # A refused delivery leaves no trace in the buyer's models.
    after = buyer.models.get("mlp")
    assert after.version == before.version
    assert buyer.models.version_for_deal(deal_id) is None
    assert buyer.trades.ledger.balances() == {}


def test_peer_error_names_reason() -> None:
    error = PeerError(ErrorMessage(Reason.BUSY, "later"))
    assert error.reason == Reason.BUSY
    assert "busy" in str(error)


async def test_competitor_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    seller.config.agent.competitors = [buyer.peer_id_text]
    seller.config.agent.competitor_policy = "refuse"
    valid = await offer_model(seller, buyer, price=100)
    with pytest.raises(BuyError) as error:
        await buyer.trades.buyer.buy(valid, max_price=1000)
    assert error.value.reason == Reason.DECLINED
    assert seller.trades.deals.list() == []


async def test_competitor_pays_for_its_gain(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path, pricing="nash", share=0.5)
    seller.config.agent.competitors = [buyer.peer_id_text]
    seller.config.agent.competitor_policy = "premium"
    seller.config.agent.prior_gain = 0.05
    seller.config.agent.value_per_gain = 1000.0
    valid = await offer_model(seller, buyer, price=100, reserve=60)
    deal_id = await buy_and_wait(buyer, valid, max_price=300)
    record = buyer.trades.deals.get(deal_id)
    assert record is not None
    # The seller's loss is 0.05 * 1000 = 50: reserve 110, ask 150, and the
    # Nash split of the surplus up to the buyer's 300 is capped at the ask.
    assert record.price == 150


async def test_seller_stops_after_refusals(nursery: trio.Nursery, tmp_path: Path) -> None:
    seller, buyer = await pair(nursery, tmp_path)
    seller.config.agent.max_refusals = 1
    await buyer.init_model("mlp", epochs=3)
    mine = buyer.models.get("mlp")
    path = tmp_path / "same.safetensors"
    await trio.to_thread.run_sync(lambda: buyer.models.export(mine, path))
    await trio.to_thread.run_sync(lambda: seller.models.import_file(path, name="mlp", task="digits", now_ms=seller.now_ms()))
    first = await seller.publish(OfferRequest(model="mlp", price=10, payment=PaymentTerms.GAIN, min_gain_ppm=10_000))
    await wait_for_offer(buyer, first.offer_id)
    valid = buyer.gossip.book.get(first.offer_id)
    assert valid is not None
    deal_id = await buy_and_wait(buyer, valid)
    refused = buyer.trades.deals.get(deal_id)
    assert refused is not None
    assert refused.state is DealState.REFUSED
    await wait_for_deal_end(seller, deal_id)

    second = await seller.publish(OfferRequest(model="mlp", price=10))
    await wait_for_offer(buyer, second.offer_id)
    again = buyer.gossip.book.get(second.offer_id)
    assert again is not None
    with pytest.raises(BuyError) as error:
        await buyer.trades.buyer.buy(again)
    assert error.value.reason == Reason.DECLINED
