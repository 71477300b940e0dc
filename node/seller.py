"""The seller's side of a trade: answer bids, serve chunks, countersign receipts.

Each handler reads only what its stream's limits allow and answers anything
wrong with an `ErrorMessage` (or a signed `Reject` in a negotiation) before
closing the stream, so a misbehaving buyer costs a stream, never the daemon.
Chunks are served only to the buyer named in a signed deal, read from the
offered file by range, without loading the model into memory.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from node.deals import LedgerConflict
from node.streams import PeerError, StreamFailed, StreamIO, most_telling
from protocol import limits
from protocol.codec import encode
from protocol.deal import Deal, DealEvent, DealState, InvalidTransition
from protocol.errors import Reason, RemoteProtocolError
from protocol.framing import frame
from protocol.identity import peer_id_to_text
from protocol.ledger import check_receipt
from protocol.manifest import chunk_bounds, chunk_count
from protocol.messages import (
    UNSIGNED,
    Accept,
    Bid,
    ChunkHeader,
    ChunkRequest,
    Counter,
    Manifest,
    Offer,
    Outcome,
    Receipt,
    Reject,
    Role,
    countersign_receipt,
    sign_accept,
    sign_counter,
    sign_reject,
    verify_receipt,
)
from protocol.negotiation import check_accept, check_first_bid, check_next_proposal
from protocol.pricing import (
    PricingPolicy,
    SellerPricing,
    competitor_terms,
    expected_gain,
    may_sell,
    seller_price,
)

if TYPE_CHECKING:
    from node.trades import Trades

logger = logging.getLogger(__name__)

NEGOTIATION_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 30.0
# A buyer may fetch a deal's bytes this many times over (resumes and
# re-fetches of bad chunks) before the seller stops serving it.
MAX_SERVED_FACTOR = 4


class Seller:
    def __init__(self, trades: Trades) -> None:
        self.trades = trades
        self.sent: dict[bytes, set[int]] = {}
        self.served_bytes: dict[bytes, int] = {}

    # Negotiation -------------------------------------------------------------

    async def serve_negotiation(self, stream: Any) -> None:
        io = self.trades.stream_io(stream)
        buyer = io.peer_id
        try:
            await self._negotiate(io, buyer)
        except RemoteProtocolError as exc:
            self.trades.log_peer_error("negotiation", buyer, exc)
            await io.send_error(exc)
        except (StreamFailed, PeerError) as exc:
            logger.debug("Negotiation with %s ended: %s", buyer.hex()[-12:], exc)
        finally:
            await io.close()

    async def _negotiate(self, io: StreamIO, buyer: bytes) -> None:
        trades = self.trades
        bid = await io.expect(Bid, timeout=NEGOTIATION_TIMEOUT_S)
        published = trades.publisher.get(bid.terms.offer_id)
        if published is None:
            raise RemoteProtocolError(Reason.UNKNOWN_OFFER, "this node has no such offer")
        now = trades.now_ms()
        check_first_bid(bid, offer=published.offer, offer_id=published.offer_id, sender=buyer, now_ms=now)
        machine = Deal(Role.SELLER, expires_ms=bid.terms.expires_ms)
        market, agent = trades.config.market, trades.config.agent
        ask, reserve = published.offer.price, published.reserve
        if peer_id_to_text(buyer) in agent.competitors:
            if agent.competitor_policy == "refuse":
                await self._reject(io, bid, Reason.DECLINED, "this seller does not sell to competitors")
                return
            # A competitor's gain is this seller's loss: price it in.
            ask, reserve = competitor_terms(
                ask=ask, reserve=reserve, buyer_gain=self.expected_buyer_gain(buyer), value_per_gain=agent.value_per_gain
            )
        pricing = SellerPricing(ask=ask, reserve=reserve, policy=PricingPolicy(market.pricing), share=market.share)

        last: Bid | Counter = bid
        while True:
            assert isinstance(last, Bid)
            price = seller_price(pricing, last.terms.price)
            if price is not None:
                why = may_sell(
                    owed=trades.ledger.balance_with(buyer),
                    outstanding=trades.deals.exposure(buyer),
                    price=price,
                    credit_limit=market.credit_limit,
                    refusals=self.refusals(buyer),
                    max_refusals=agent.max_refusals or None,
                )
                if why is not None:
                    reason = Reason.CREDIT_LIMIT if "credit" in why else Reason.DECLINED
                    await self._reject(io, last, reason, why)
                    return
            if price is None:
                await self._reject(io, last, Reason.PRICE_BELOW_RESERVE, "the bid is below this seller's price")
                return

            if price == last.terms.price:
                accept = sign_accept(last, trades.signer)
                machine.apply(DealEvent.ACCEPT, trades.now_ms())
                self._store_agreed(accept, published.offer, published.model, published.version)
                await io.send(accept)
                return

            if last.round + 1 > limits.MAX_NEGOTIATION_ROUNDS:
                await self._reject(io, last, Reason.TOO_MANY_ROUNDS, "no agreement within the round limit")
                return
            counter = sign_counter(dataclasses.replace(last.terms, price=price), last.round + 1, trades.signer)
            machine.apply(DealEvent.COUNTER, trades.now_ms())
            await io.send(counter)

            reply = await io.read_message([Accept, Bid, Reject], timeout=NEGOTIATION_TIMEOUT_S)
            if reply is None:
                raise RemoteProtocolError(Reason.TRUNCATED, "the buyer closed the negotiation")
            if isinstance(reply, Reject):
                machine.apply(DealEvent.REJECT, trades.now_ms())
                logger.info("Buyer %s rejected the counter of %d", buyer.hex()[-12:], price)
                return
            if isinstance(reply, Accept):
                check_accept(reply, proposal=counter, sender=buyer)
                machine.apply(DealEvent.ACCEPT, trades.now_ms())
                self._store_agreed(reply, published.offer, published.model, published.version)
                # Echo the accept, so the buyer learns that this node stored the deal.
                await io.send(reply)
                return
            assert isinstance(reply, Bid)
            check_next_proposal(reply, previous=counter, sender=buyer)
            machine.apply(DealEvent.BID, trades.now_ms())
            last = reply

    def refusals(self, buyer: bytes) -> int:
        """Receipts in which `buyer` refused to pay this node."""
        return sum(
            1 for deal in self.trades.deals.list(role=Role.SELLER, states={DealState.REFUSED}) if deal.counterparty == buyer
        )

    def expected_buyer_gain(self, buyer: bytes) -> float:
        """Estimate a buyer's gain from this node's weights from the gains its receipts reported."""
        reported = [
            deal.gain_ppm / limits.PPM
            for deal in self.trades.deals.list(role=Role.SELLER, states={DealState.PAID, DealState.REFUSED})
            if deal.counterparty == buyer and deal.gain_ppm is not None
        ]
        return expected_gain(claimed=None, history=reported, prior=self.trades.config.agent.prior_gain)

    async def _reject(self, io: StreamIO, proposal: Bid | Counter, reason: Reason, detail: str) -> None:
        trades = self.trades
        reject = sign_reject(
            Reject(
                proposal.terms.offer_id, proposal.terms.nonce, proposal.round, trades.signer.peer_id, reason, detail, UNSIGNED
            ),
            trades.signer,
        )
        logger.info("Rejected a bid of %d from %s: %s", proposal.terms.price, proposal.terms.buyer.hex()[-12:], detail)
        await io.send(reject)

    def _store_agreed(self, accept: Accept, offer: Offer, model: str, version: int) -> None:
        trades = self.trades
        trades.deals.insert(
            role=Role.SELLER,
            state=DealState.AGREED,
            offer=offer,
            terms=accept.terms,
            accept=accept,
            now_ms=trades.now_ms(),
            model=model,
            model_version=version,
        )
        logger.info(
            "Deal %s agreed: selling offer %s to %s for %d",
            accept.deal_id.hex()[:12], accept.terms.offer_id.hex()[:12], accept.terms.buyer.hex()[-12:], accept.terms.price,
        )

    # Transfer ---------------------------------------------------------------------

    async def serve_transfer(self, stream: Any) -> None:
        io = self.trades.stream_io(stream)
        buyer = io.peer_id
        try:
            await self._transfer(io, buyer)
        except RemoteProtocolError as exc:
            self.trades.log_peer_error("transfer", buyer, exc)
            await io.send_error(exc)
        except StreamFailed as exc:
            logger.debug("Transfer to %s stopped: %s", buyer.hex()[-12:], exc)
        finally:
            await io.close()

    async def _transfer(self, io: StreamIO, buyer: bytes) -> None:
        trades = self.trades
        request = await io.expect(ChunkRequest, timeout=REQUEST_TIMEOUT_S)
        deal = trades.deals.get(request.deal_id)
        if deal is None or deal.role != Role.SELLER:
            raise RemoteProtocolError(Reason.UNKNOWN_DEAL, "this node sells no such deal")
        if deal.counterparty != buyer:
            raise RemoteProtocolError(Reason.WRONG_PEER, "chunks are served only to the deal's buyer")
        try:
            trades.deals.apply(deal.deal_id, DealEvent.TRANSFER_STARTED, now_ms=trades.now_ms())
        except InvalidTransition:
            raise RemoteProtocolError(Reason.INVALID_STATE, f"the deal is {deal.state.value}") from None
        current = trades.deals.get(deal.deal_id)
        assert current is not None
        if current.state is DealState.EXPIRED:
            raise RemoteProtocolError(Reason.EXPIRED, "the deal expired before delivery")

        published = trades.publisher.get(deal.offer_id)
        if published is None:
            raise RemoteProtocolError(Reason.INTERNAL, "the offered file is gone")
        manifest = published.manifest
        count = chunk_count(manifest.total_bytes, manifest.chunk_size)
        for index in request.indices():
            if index >= count:
                raise RemoteProtocolError(Reason.UNKNOWN_CHUNK, f"chunk {index} is outside 0..{count - 1}")
        served = self.served_bytes.get(deal.deal_id, 0)
        if served > MAX_SERVED_FACTOR * manifest.total_bytes:
            raise RemoteProtocolError(Reason.BUSY, "this deal's bytes were already served several times over")

        if request.want_manifest:
            await io.write(frame(published.manifest_bytes))
        sent = self.sent.setdefault(deal.deal_id, set())
        try:
            await self._send_chunks(io, deal.deal_id, published.path, manifest, request.indices(), sent)
        except BaseExceptionGroup as group:
            raise most_telling(group, (RemoteProtocolError, StreamFailed)) from None
        if len(sent) == count:
            try:
                trades.deals.apply(deal.deal_id, DealEvent.TRANSFER_DONE, now_ms=trades.now_ms())
            except InvalidTransition:
                pass  # settled meanwhile by a receipt on another stream

    async def _send_chunks(
        self, io: StreamIO, deal_id: bytes, path: Path, manifest: Manifest, indices: list[int], sent: set[int]
    ) -> None:
        """Send each chunk of `indices` as a ChunkHeader frame and its bytes."""
        hooks = self.trades.hooks
        with open(path, "rb") as handle:
            async with trio.open_nursery() as nursery:
                # A worker thread reads chunk i + 1 from the disk while chunk i goes out.
                send_channel, receive_channel = trio.open_memory_channel[tuple[int, memoryview]](0)
                nursery.start_soon(_read_ahead, handle.fileno(), manifest, indices, send_channel)
                async with receive_channel:
                    async for index, chunk in receive_channel:
                        data = hooks.outgoing_chunk(deal_id, index, chunk)
                        await io.write(frame(encode(ChunkHeader(index, len(data)))))
                        cut = hooks.cut_chunk(deal_id, index)
                        if cut is not None:
                            await io.write(data[:cut])
                            await io.reset()
                            nursery.cancel_scope.cancel()
                            return
                        await io.write(data)
                        sent.add(index)
                        self.served_bytes[deal_id] = self.served_bytes.get(deal_id, 0) + len(data)

    # Settlement ------------------------------------------------------------------

    async def serve_settlement(self, stream: Any) -> None:
        io = self.trades.stream_io(stream)
        buyer = io.peer_id
        try:
            receipt = await io.expect(Receipt, timeout=REQUEST_TIMEOUT_S)
            countersigned = self.settle(receipt, buyer)
            await io.send(countersigned)
        except RemoteProtocolError as exc:
            self.trades.log_peer_error("settlement", buyer, exc)
            await io.send_error(exc)
        except StreamFailed as exc:
            logger.debug("Settlement with %s failed: %s", buyer.hex()[-12:], exc)
        finally:
            await io.close()

    def settle(self, receipt: Receipt, buyer: bytes) -> Receipt:
        """Check a buyer's receipt, countersign it and record it; idempotent per deal."""
        trades = self.trades
        verify_receipt(receipt, require_countersigned=False)
        deal = trades.deals.get(receipt.deal_id)
        if deal is None or deal.role != Role.SELLER:
            raise RemoteProtocolError(Reason.UNKNOWN_DEAL, "this node sold no such deal")
        if receipt.buyer != buyer or deal.counterparty != buyer:
            raise RemoteProtocolError(Reason.WRONG_PEER, "a receipt must come from the deal's buyer")
        check_receipt(receipt, deal.terms)

        existing = trades.ledger.entry_for_deal(deal.deal_id)
        if existing is not None:
            if existing.receipt.receipt_id == receipt.receipt_id:
                return existing.receipt
            raise RemoteProtocolError(Reason.DUPLICATE_RECEIPT, "another receipt is already recorded for this deal")

        countersigned = countersign_receipt(receipt, trades.signer)
        event = DealEvent.SIGN_PAID if receipt.outcome == Outcome.PAID else DealEvent.SIGN_REFUSAL
        now = trades.now_ms()
        try:
            with trades.db.transaction() as connection:
                trades.deals.apply(
                    deal.deal_id,
                    event,
                    now_ms=now,
                    connection=connection,
                    receipt=countersigned,
                    gain_ppm=receipt.gain_ppm,
                    accuracy_delta_ppm=receipt.accuracy_delta_ppm,
                    reason=receipt.reason.name.lower() if receipt.outcome == Outcome.REFUSED else "",
                )
                trades.ledger.append(connection, countersigned, now)
        except InvalidTransition:
            raise RemoteProtocolError(Reason.INVALID_STATE, f"the deal is {deal.state.value}") from None
        except LedgerConflict as exc:
            raise RemoteProtocolError(Reason.DUPLICATE_RECEIPT, str(exc)) from None
        outcome = receipt.outcome.name.lower()
        trades.metrics.trades.labels(role="seller", outcome=outcome).inc()
        logger.info(
            "Deal %s settled: %s %d by %s (gain %.4f)",
            deal.deal_id.hex()[:12], outcome, receipt.amount, buyer.hex()[-12:], receipt.gain_ppm / limits.PPM,
        )
        self.sent.pop(deal.deal_id, None)
        return countersigned


async def _read_ahead(
    fd: int, manifest: Manifest, indices: Iterable[int], channel: trio.MemorySendChannel[tuple[int, memoryview]]
) -> None:
    """Make each chunk of `indices` ready in a worker thread and send it on `channel`.

    Where the kernel can fill a memory map of the file on request
    (MADV_POPULATE_READ, Linux 5.14 and later), a chunk is a view of the
    map. Its bytes then go from the page cache to the cipher without a
    copy, and the worker thread takes any disk reads. Elsewhere chunks are
    read into two buffers that alternate. `channel` has no capacity, so a
    send returns only once the receiver has taken the chunk. By then the
    receiver is done with the chunk before, so that buffer is free.

    NOTE: a mapped file that shrinks while it is served makes the process
    die of SIGBUS. The model store never rewrites a version's file in place,
    but nothing stops another program from truncating it.
    """
    mapping = _map_file(fd, manifest.total_bytes)
    size = min(manifest.chunk_size, manifest.total_bytes)
    buffers = [memoryview(bytearray(size)), memoryview(bytearray(size))] if mapping is None else []
    async with channel:
        for count, index in enumerate(indices):
            begin, end = chunk_bounds(manifest, index)
            if mapping is not None:
                await trio.to_thread.run_sync(_populate, mapping, begin, end)
                chunk = memoryview(mapping)[begin:end]
            else:
                chunk = buffers[count % 2][: end - begin]
                read = await trio.to_thread.run_sync(os.preadv, fd, [chunk], begin)
                if read != end - begin:
                    raise RemoteProtocolError(Reason.INTERNAL, f"the offered file ends inside chunk {index}")
            await channel.send((index, chunk))


# madvise(2) advice that faults a range of a mapping in, reading the file as
# needed, and fails with EINVAL on kernels before Linux 5.14. The mmap module
# of Python 3.11 has no name for it.
MADV_POPULATE_READ = 22


def _map_file(fd: int, size: int) -> mmap.mmap | None:
    """Map the file read-only if the kernel can populate the map on request; else None."""
    if not sys.platform.startswith("linux") or size == 0:
        return None
    try:
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    try:
        mapping.madvise(MADV_POPULATE_READ, 0, min(size, mmap.PAGESIZE))
        if os.fstat(fd).st_size < size:
            raise ValueError("the offered file is shorter than its manifest")
    except (OSError, ValueError):
        mapping.close()
        return None
    return mapping


def _populate(mapping: mmap.mmap, begin: int, end: int) -> None:
    """Read [begin, end) of the file into the page cache and map it (in a worker thread)."""
    start = begin - begin % mmap.PAGESIZE
    mapping.madvise(MADV_POPULATE_READ, start, end - start)
