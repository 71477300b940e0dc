"""The buyer's side of a trade: bid, fetch verified chunks, try, merge, pay.

`Buyer.buy` negotiates on the calling task and returns the agreed deal; the
rest runs as a background task per deal that picks up where the deal's
stored state says, so a restart of either node resumes it:

* AGREED or TRANSFERRING: fetch the manifest (checked against the signed
  root) and every chunk not yet in the chunk store, hashing off the trio
  thread while the stream keeps draining. A broken stream is retried with
  backoff until the deal expires; a chunk that fails its hash is fetched
  again, up to `[transfer] max_chunk_attempts` times, then the deal fails
  and nothing is paid.
* EVALUATING: assemble the file, try it on a worker (decode, checks,
  alignment, merge search), commit the merged model or store the weights,
  and sign a receipt that pays or refuses as the terms allow.
* SETTLING_PAID or SETTLING_REFUSED: send the receipt until the seller
  countersigns, then record it in the ledger.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import mmap
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from node.deals import DealRecord, LedgerConflict
from node.streams import PeerError, StreamFailed, StreamIO, most_telling
from protocol import limits
from protocol.codec import decode, encode
from protocol.deal import DealEvent, DealState, InvalidTransition
from protocol.errors import Reason, RemoteProtocolError
from protocol.identity import peer_id_to_text
from protocol.manifest import chunk_bounds, chunk_count, decode_manifest, verify_chunk
from protocol.messages import (
    UNSIGNED,
    Accept,
    Bid,
    ChunkHeader,
    ChunkRequest,
    Counter,
    DealTerms,
    ErrorMessage,
    Manifest,
    Outcome,
    PaymentTerms,
    Receipt,
    Reject,
    Role,
    sign_accept,
    sign_bid,
    sign_receipt,
    sign_reject,
    verify_receipt,
    verify_reject,
)
from protocol.negotiation import check_accept, check_next_proposal
from protocol.offers import ValidOffer
from protocol.pricing import buyer_accepts

if TYPE_CHECKING:
    from node.models import ModelVersion
    from node.trades import Trades

logger = logging.getLogger(__name__)

NEGOTIATION_TIMEOUT_S = 15.0
# Consecutive failed attempts to reach the seller before a transfer gives up
# (the backoff between them grows to 10 s, so about a minute in all).
MAX_TRANSFER_FAILURES = 8
CHUNK_TIMEOUT_S = 30.0
SETTLE_ATTEMPTS = 8
VERIFIERS = 2  # chunks hashed and written in parallel threads
QUEUED_CHUNKS = 4  # chunks read and waiting for a verifier
# A ChunkHeader frame takes at most 14 bytes, so reading 64 bytes for one
# leaves the chunk's data in the stream, to be copied once, by `read_into`.
HEADER_READ_SIZE = 64


class BuyError(Exception):
    """A purchase this node will not start or could not agree; `reason` says why."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TradeFailed(Exception):
    """A deal that cannot complete; nothing is paid."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.name.lower()}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Progress:
    chunks_total: int = 0
    chunks_done: int = 0
    bytes_done: int = 0
    fetched: int = 0  # chunks received over the network, verified or not
    # Seconds spent in each phase of the deal since this node started it,
    # kept in memory only: negotiate, transfer, verify, sync, evaluate,
    # merge, commit and receipt. Transfer ends when the last chunk's bytes
    # arrived. Verify is the hashing and writing of the chunks still queued
    # then. Sync is the fdatasync and rename of the delivered file.
    phases: dict[str, float] = field(default_factory=dict)

    def add_phase(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds


class Buyer:
    def __init__(self, trades: Trades) -> None:
        self.trades = trades
        self.progress: dict[bytes, Progress] = {}
        self._running: set[bytes] = set()
        self.finished: dict[bytes, trio.Event] = {}

    # Starting a purchase ------------------------------------------------------------

    def committed(self) -> int:
        """Prices of this node's purchases that are agreed but not yet settled."""
        open_states = {
            DealState.AGREED, DealState.TRANSFERRING, DealState.EVALUATING, DealState.SETTLING_PAID,
        }
        return sum(d.price for d in self.trades.deals.list(role=Role.BUYER, states=open_states))

    def check_budget(self, value: int) -> None:
        """Raise BuyError if bidding `value` could take spending over the budget."""
        _, spent = self.trades.ledger.totals()
        budget = self.trades.config.market.budget
        available = budget - spent - self.committed()
        if value > available:
            raise BuyError(
                Reason.BUDGET_EXCEEDED,
                f"a bid of {value} is above what the budget allows: {available} of {budget} left "
                f"({spent} spent, {self.committed()} committed to open deals); lower --max-price or raise [market] budget",
            )

    async def buy(self, valid: ValidOffer, *, max_price: int | None = None) -> DealRecord:
        """Negotiate for an offer, store the deal and start fetching it in the background."""
        trades = self.trades
        offer = valid.offer
        if offer.seller == trades.signer.peer_id:
            raise BuyError(Reason.WRONG_PEER, "this offer is this node's own")
        for earlier in trades.deals.list(role=Role.BUYER):
            if earlier.offer_id == valid.offer_id and (earlier.state is DealState.PAID or not earlier.terminal):
                state = "paid" if earlier.state is DealState.PAID else f"still {earlier.state.value}"
                raise BuyError(
                    Reason.INVALID_STATE,
                    f"this node already bought offer {valid.offer_id.hex()[:12]} in deal {earlier.deal_id.hex()[:12]} "
                    f"({state}); see `pmarket deals`",
                )
        value = offer.price if max_price is None else max_price
        if value < 0:
            raise BuyError(Reason.INVALID_FIELD, f"--max-price {value} must not be negative")
        # Every agreed price is at most the ask, so that is the most this can cost.
        self.check_budget(min(value, offer.price))

        started = time.perf_counter()
        accept = await self._negotiate(valid, value)
        negotiated = time.perf_counter() - started
        record = trades.deals.insert(
            role=Role.BUYER, state=DealState.AGREED, offer=offer, terms=accept.terms, accept=accept, now_ms=trades.now_ms()
        )
        self.progress.setdefault(record.deal_id, Progress()).add_phase("negotiate", negotiated)
        logger.info(
            "Deal %s agreed: buying offer %s from %s for %d",
            record.deal_id.hex()[:12], valid.offer_id.hex()[:12], offer.seller.hex()[-12:], record.price,
        )
        self.start(record.deal_id)
        return record

    async def _negotiate(self, valid: ValidOffer, value: int) -> Accept:
        trades = self.trades
        offer = valid.offer
        now = trades.now_ms()
        terms = DealTerms(
            offer_id=valid.offer_id,
            seller=offer.seller,
            buyer=trades.signer.peer_id,
            manifest_root=offer.manifest_root,
            total_bytes=offer.total_bytes,
            price=value,
            payment=offer.payment,
            min_gain_ppm=offer.min_gain_ppm,
            nonce=secrets.token_bytes(limits.NONCE_SIZE),
            expires_ms=min(now + int(trades.config.transfer.deal_ttl_s * 1000), now + limits.MAX_DEAL_LIFETIME_MS),
        )
        proposal: Bid | Counter = sign_bid(terms, 0, trades.signer)
        io = await trades.open_stream(offer.seller, trades.NEGOTIATE)
        try:
            await io.send(proposal)
            while True:
                reply = await io.read_message([Accept, Counter, Reject], timeout=NEGOTIATION_TIMEOUT_S)
                if reply is None:
                    raise BuyError(Reason.TRUNCATED, "the seller closed the negotiation without an answer")
                if isinstance(reply, Reject):
                    verify_reject(reply)
                    raise BuyError(reply.reason, _rejection_message(reply, bid=value, ask=offer.price))
                if isinstance(reply, Accept):
                    check_accept(reply, proposal=proposal, sender=offer.seller)
                    return reply
                assert isinstance(reply, Counter)
                check_next_proposal(reply, previous=proposal, sender=offer.seller)
                if not buyer_accepts(reply.terms.price, value):
                    reject = Reject(valid.offer_id, terms.nonce, reply.round, trades.signer.peer_id,
                                    Reason.PRICE_ABOVE_LIMIT, f"the limit is {value}", UNSIGNED)
                    await io.send(sign_reject(reject, trades.signer))
                    raise BuyError(
                        Reason.PRICE_ABOVE_LIMIT,
                        f"the seller asks {reply.terms.price}, above this node's limit of {value}; raise --max-price to buy",
                    )
                accept = sign_accept(reply, trades.signer)
                await io.send(accept)
                echo = await io.read_message([Accept], timeout=NEGOTIATION_TIMEOUT_S)
                if echo != accept:
                    raise BuyError(Reason.TRUNCATED, "the seller did not confirm the accepted counter")
                return accept
        except RemoteProtocolError as exc:
            await io.send_error(exc)
            raise BuyError(exc.reason, f"the seller broke the negotiation protocol: {exc.detail}") from None
        except PeerError as exc:
            raise BuyError(exc.reason, f"the seller reported {exc.reason.name.lower()}: {exc.detail}") from None
        except StreamFailed as exc:
            raise BuyError(Reason.TIMEOUT, f"negotiation with the seller failed: {exc}") from None
        finally:
            await io.close()

    # Running a deal -------------------------------------------------------------------

    def start(self, deal_id: bytes) -> None:
        """Run (or resume) a deal in the background unless it already runs."""
        if deal_id in self._running:
            return
        self._running.add(deal_id)
        self.finished.setdefault(deal_id, trio.Event())
        self.trades.nursery.start_soon(self._run, deal_id)

    async def _run(self, deal_id: bytes) -> None:
        trades = self.trades
        try:
            while True:
                record = trades.deals.get(deal_id)
                assert record is not None
                if record.state in (DealState.AGREED, DealState.TRANSFERRING):
                    await self._fetch(record)
                elif record.state is DealState.EVALUATING:
                    await self._evaluate(record)
                elif record.state in (DealState.SETTLING_PAID, DealState.SETTLING_REFUSED):
                    if not await self._settle(record):
                        return
                else:
                    return
        except TradeFailed as exc:
            self._fail(deal_id, exc.reason, exc.detail)
        except Exception:
            logger.exception("Deal %s stopped on an unexpected error; it resumes when the node restarts", deal_id.hex()[:12])
        finally:
            self._running.discard(deal_id)
            self.finished[deal_id].set()

    def _fail(self, deal_id: bytes, reason: Reason, detail: str) -> None:
        trades = self.trades
        try:
            trades.deals.apply(deal_id, DealEvent.TRANSFER_FAILED, now_ms=trades.now_ms(),
                               reason=reason.name.lower(), detail=detail[:500])
        except InvalidTransition:
            trades.deals.update(deal_id, now_ms=trades.now_ms(), reason=reason.name.lower(), detail=detail[:500])
        trades.metrics.trades.labels(role="buyer", outcome="failed").inc()
        logger.warning("Deal %s failed, nothing paid: %s: %s", deal_id.hex()[:12], reason.name.lower(), detail)

    def _expire_if_due(self, record: DealRecord) -> None:
        trades = self.trades
        updated = trades.deals.apply(record.deal_id, DealEvent.TIMEOUT, now_ms=trades.now_ms())
        if updated.state is DealState.EXPIRED:
            raise TradeFailed(Reason.EXPIRED, "the deal expired before the weights arrived")

    # Fetching -------------------------------------------------------------------------

    async def _fetch(self, record: DealRecord) -> None:
        trades = self.trades
        manifest = trades.deals.manifest_of(record)
        progress = self.progress.setdefault(record.deal_id, Progress())
        attempts: dict[int, int] = {}
        failures = 0
        while True:
            self._expire_if_due(record)
            if manifest is not None:
                missing = await trio.to_thread.run_sync(trades.chunks.missing, manifest)
                total = chunk_count(manifest.total_bytes, manifest.chunk_size)
                progress.chunks_total = total
                progress.chunks_done = total - len(missing)
                if not missing:
                    break
            started = time.perf_counter()
            try:
                if record.state is DealState.AGREED:
                    record = trades.deals.apply(record.deal_id, DealEvent.TRANSFER_STARTED, now_ms=trades.now_ms())
                if manifest is None:
                    manifest = await self._fetch_manifest(record)
                    progress.add_phase("transfer", time.perf_counter() - started)
                    continue
                received = await self._fetch_chunks(record, manifest, missing, attempts, progress)
                progress.add_phase("transfer", received - started)
                progress.add_phase("verify", time.perf_counter() - received)
                failures = 0
            except (StreamFailed, PeerError, RemoteProtocolError) as exc:
                progress.add_phase("transfer", time.perf_counter() - started)
                if isinstance(exc, PeerError) and exc.reason in (Reason.UNKNOWN_DEAL, Reason.WRONG_PEER, Reason.EXPIRED):
                    raise TradeFailed(exc.reason, f"the seller stopped serving: {exc.detail}") from None
                failures += 1
                if failures >= MAX_TRANSFER_FAILURES:
                    raise TradeFailed(Reason.TIMEOUT, f"the seller could not be reached {failures} times in a row: {exc}") from None
                delay = min(0.5 * 2**failures, 10.0)
                logger.info("Transfer of deal %s interrupted (%s); resuming in %.1f s", record.deal_id.hex()[:12], exc, delay)
                await trio.sleep(delay)
        trades.deals.update(record.deal_id, now_ms=trades.now_ms(), chunks_total=progress.chunks_total,
                            chunks_done=progress.chunks_done, bytes_done=manifest.total_bytes)
        trades.deals.apply(record.deal_id, DealEvent.TRANSFER_DONE, now_ms=trades.now_ms())

    async def _fetch_manifest(self, record: DealRecord) -> Manifest:
        trades = self.trades
        io = await trades.open_stream(record.counterparty, trades.TRANSFER)
        try:
            await io.send(ChunkRequest(record.deal_id, True, ()))
            data = await io.read_frame(limits.MAX_MANIFEST_SIZE, CHUNK_TIMEOUT_S)
        finally:
            await io.close()
        if data is None:
            raise StreamFailed("the seller closed the stream before the manifest")
        message = decode(data, [Manifest, ErrorMessage])
        if isinstance(message, ErrorMessage):
            raise PeerError(message)
        try:
            manifest, _ = decode_manifest(data, record.terms.manifest_root)
        except RemoteProtocolError as exc:
            raise TradeFailed(Reason.MANIFEST_MISMATCH, f"the seller's manifest is not the one its offer signed: {exc.detail}") from None
        if manifest.total_bytes != record.terms.total_bytes:
            raise TradeFailed(Reason.MANIFEST_MISMATCH, "the manifest's size differs from the deal's")
        trades.deals.update(record.deal_id, now_ms=trades.now_ms(), manifest=encode(manifest),
                            chunks_total=chunk_count(manifest.total_bytes, manifest.chunk_size))
        return manifest

    async def _fetch_chunks(
        self,
        record: DealRecord,
        manifest: Manifest,
        missing: list[int],
        attempts: dict[int, int],
        progress: Progress,
    ) -> float:
        """Request the missing chunks on one stream; store each that verifies.

        Returns the `time.perf_counter()` at which the last chunk's bytes
        arrived; the chunks are all verified and stored when this returns.
        """
        ranges = _ranges(missing)
        requested = [index for first, count in ranges for index in range(first, first + count)]
        buffer_size = min(manifest.chunk_size, manifest.total_bytes)
        buffers = min(VERIFIERS + QUEUED_CHUNKS + 1, len(requested))
        io = await self.trades.open_stream(record.counterparty, self.trades.TRANSFER)
        try:
            await io.send(ChunkRequest(record.deal_id, False, ranges))
            # The reader keeps draining the stream (a Yamux sender resets a
            # stream that gets no window update for a while) while verifier
            # tasks hash and write chunks in threads. Chunks travel in a fixed
            # set of buffers, which bounds the memory a transfer takes.
            # The buffers are anonymous memory maps, which are page-aligned, so
            # the chunk store can write them to the disk directly.
            free_send, free_receive = trio.open_memory_channel[mmap.mmap](buffers)
            for _ in range(buffers):
                free_send.send_nowait(mmap.mmap(-1, buffer_size))
            send_channel, receive_channel = trio.open_memory_channel[tuple[int, mmap.mmap, int]](QUEUED_CHUNKS)
            async with trio.open_nursery() as nursery:
                for _ in range(VERIFIERS):
                    nursery.start_soon(
                        self._verify_chunks, record, manifest, receive_channel.clone(), free_send, attempts, progress
                    )
                receive_channel.close()
                async with send_channel:
                    received = await self._read_chunks(io, record, manifest, requested, progress, send_channel, free_receive)
            return received
        except BaseExceptionGroup as group:
            raise _most_telling(group) from None
        finally:
            await io.close()

    async def _read_chunks(
        self,
        io: StreamIO,
        record: DealRecord,
        manifest: Manifest,
        requested: list[int],
        progress: Progress,
        send_channel: trio.MemorySendChannel[tuple[int, mmap.mmap, int]],
        free_buffers: trio.MemoryReceiveChannel[mmap.mmap],
    ) -> float:
        """Read each requested chunk into a free buffer and queue it; return when the last arrived."""
        for index in requested:
            header = await io.expect(ChunkHeader, timeout=CHUNK_TIMEOUT_S, read_size=HEADER_READ_SIZE)
            begin, end = chunk_bounds(manifest, index)
            if header.index != index or header.size != end - begin:
                raise RemoteProtocolError(
                    Reason.INVALID_FIELD,
                    f"expected chunk {index} of {end - begin} bytes, got chunk {header.index} of {header.size}",
                )
            buffer = await free_buffers.receive()
            await io.read_into(memoryview(buffer)[: header.size], CHUNK_TIMEOUT_S)
            progress.fetched += 1
            self.trades.hooks.received_chunk(record.deal_id, index)
            await send_channel.send((index, buffer, header.size))
        return time.perf_counter()

    async def _verify_chunks(
        self,
        record: DealRecord,
        manifest: Manifest,
        receiver: trio.MemoryReceiveChannel[tuple[int, mmap.mmap, int]],
        free_buffers: trio.MemorySendChannel[mmap.mmap],
        attempts: dict[int, int],
        progress: Progress,
    ) -> None:
        limit = self.trades.config.transfer.max_chunk_attempts
        async with receiver:
            async for index, buffer, size in receiver:
                stored = await trio.to_thread.run_sync(self._verify_and_put, manifest, index, memoryview(buffer)[:size])
                free_buffers.send_nowait(buffer)
                if stored:
                    progress.chunks_done += 1
                    progress.bytes_done += size
                    continue
                attempts[index] = attempts.get(index, 0) + 1
                logger.info("Chunk %d of deal %s failed its hash (attempt %d of %d)",
                            index, record.deal_id.hex()[:12], attempts[index], limit)
                if attempts[index] >= limit:
                    raise TradeFailed(Reason.CHUNK_HASH_MISMATCH, f"chunk {index} failed its hash {attempts[index]} times")

    def _verify_and_put(self, manifest: Manifest, index: int, data: bytes | memoryview) -> bool:
        """Runs in a thread: hash the chunk and store it if it matches."""
        try:
            verify_chunk(manifest, index, data)
        except RemoteProtocolError:
            return False
        self.trades.chunks.put(manifest, index, data)
        return True

    # Evaluating ------------------------------------------------------------------------

    async def _evaluate(self, record: DealRecord) -> None:
        from node.evaluate import evaluate_delivery, local_task_data

        trades = self.trades
        manifest = trades.deals.manifest_of(record)
        assert manifest is not None
        incoming = trades.data_dir.models / ".incoming" / f"{record.deal_id.hex()}.safetensors"
        progress = self.progress.setdefault(record.deal_id, Progress())
        if not incoming.exists():
            started = time.perf_counter()
            try:
                await trio.to_thread.run_sync(trades.chunks.assemble, manifest, incoming)
            except FileNotFoundError:
                # A chunk vanished (removed by another deal): fetch again.
                trades.deals.update(record.deal_id, now_ms=trades.now_ms(), state=DealState.TRANSFERRING.value)
                return
            except ValueError as exc:
                await self._sign(record, Outcome.REFUSED, Reason.MANIFEST_MISMATCH, detail=str(exc))
                return
            progress.add_phase("sync", time.perf_counter() - started)

        # A crash after committing the model but before signing leaves the
        # model row with this deal's ID: reuse it instead of merging twice.
        committed = trades.models.version_for_deal(record.deal_id)
        # The base to merge into: a model of this node's task, so that an
        # imported copy without a task does not turn a merge into a purchase.
        local = trades.models.latest_of_family(record.offer.family, task=trades.config.task.name)
        data = local_task_data(trades.config.task)
        task = data.task if data is not None and local is not None and local.task == data.task.name else None
        if committed is not None:
            decision = "merge" if committed.source == "merge" else "outright"
            await self._sign(record, _outcome_for(record, decision, None), Reason.OK, model=committed.name,
                             model_version=committed.version, gain=committed.metrics.get("gain"))
            return

        # Under gain terms, a merge that gains less than the offer's minimum
        # would be used without being paid for: such a delivery is not merged.
        min_gain = trades.config.market.min_gain
        if record.terms.payment == PaymentTerms.GAIN:
            min_gain = max(min_gain, record.terms.min_gain_ppm / limits.PPM)
        align = trades.config.task.align

        def job(device: str):  # type: ignore[no-untyped-def]
            return evaluate_delivery(
                incoming,
                local=trades.models.load_tensors(local) if local is not None else None,
                task=task,
                validation=data.validation if (data is not None and task is not None) else None,
                align=align,
                device=device,
                min_gain=min_gain,
            )

        started = time.perf_counter()
        evaluation = await trades.workers.run(job)
        progress.add_phase("evaluate", time.perf_counter() - started - evaluation.merge_seconds)
        progress.add_phase("merge", evaluation.merge_seconds)
        logger.info(
            "Deal %s evaluated: %s (gain %s, accuracy %s -> %s)",
            record.deal_id.hex()[:12], evaluation.decision,
            "n/a" if evaluation.gain is None else f"{evaluation.gain:.4f}",
            evaluation.accuracy_before, evaluation.accuracy_after,
        )

        if evaluation.decision == "invalid":
            await self._sign(record, Outcome.REFUSED, evaluation.reason, detail="; ".join(evaluation.problems)[:500],
                             gain=evaluation.gain, evaluation=evaluation)
            return

        metrics = {
            key: value
            for key, value in (
                ("gain", evaluation.gain),
                ("val_loss", evaluation.loss_after),
                ("val_accuracy", evaluation.accuracy_after),
                ("alpha", evaluation.alpha),
            )
            if value is not None
        }
        # A merge keeps training where the local model left off.
        if evaluation.decision == "merge" and local is not None:
            metrics["epochs"] = float(local.metrics.get("epochs", 0.0))
        model_name, model_version = "", None
        started = time.perf_counter()
        if evaluation.decision == "merge" and local is not None and evaluation.merged is not None:
            version = await trio.to_thread.run_sync(
                lambda: trades.models.add_tensors(
                    local.name, evaluation.merged, task=local.task, source="merge", parent=local.version,
                    deal_id=record.deal_id, metrics=metrics, now_ms=trades.now_ms(),
                )
            )
            model_name, model_version = version.name, version.version
        elif evaluation.decision == "outright":
            name = self._purchase_name(record)
            version = await trio.to_thread.run_sync(
                lambda: trades.models.add_file(
                    # A partial offer is not a whole model of its task.
                    name, incoming, task="" if record.offer.tensors else record.offer.task, source="purchase",
                    deal_id=record.deal_id, metrics=metrics, now_ms=trades.now_ms(),
                )
            )
            model_name, model_version = version.name, version.version
        progress.add_phase("commit", time.perf_counter() - started)
        outcome = _outcome_for(record, evaluation.decision, evaluation.gain)
        reason = Reason.OK if outcome == Outcome.PAID else Reason.GAIN_BELOW_MINIMUM
        await self._sign(record, outcome, reason, gain=evaluation.gain, evaluation=evaluation,
                         model=model_name, model_version=model_version)

    def _purchase_name(self, record: DealRecord) -> str:
        """Return the name under which to store weights bought outright.

        An outright purchase never becomes a new version of a model that this
        node created, imported, trained or merged. The candidates, in order:

        * the offer's model name (its offer key up to any ':', with
          characters a model name cannot hold replaced by '-'), say ``mlp``;
        * that name, '-' and the last 6 characters of the seller's peer ID,
          as `pmarket deals` shows them, say ``mlp-Xk3pQz``;
        * that name followed by -2, -3, ...

        The first candidate that no model has yet is taken, or one whose every
        version is an outright purchase of the same family from the same
        seller: buying from that seller again adds the next version there.
        """
        base = record.offer.offer_key.split(":")[0]
        base = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in base)
        base = base.lstrip("-_.")[:48] or "bought"
        by_name: dict[str, list[ModelVersion]] = {}
        for version in self.trades.models.list():
            by_name.setdefault(version.name, []).append(version)

        def bought_here(version: ModelVersion) -> bool:
            if version.source != "purchase" or version.family != record.offer.family or version.deal_id is None:
                return False
            deal = self.trades.deals.get(version.deal_id)
            return deal is not None and deal.counterparty == record.counterparty

        seller_name = f"{base}-{peer_id_to_text(record.counterparty)[-6:]}"
        candidates = itertools.chain((base, seller_name), (f"{seller_name}-{n}" for n in itertools.count(2)))
        for name in candidates:
            versions = by_name.get(name, [])
            if all(bought_here(version) for version in versions):
                return name
        raise AssertionError("unreachable: the candidates never end")

    async def _sign(
        self,
        record: DealRecord,
        outcome: Outcome,
        reason: Reason,
        *,
        detail: str = "",
        gain: float | None = None,
        evaluation: object | None = None,
        model: str = "",
        model_version: int | None = None,
    ) -> None:
        trades = self.trades
        started = time.perf_counter()
        # A receipt carries 0 for what was not measured. The deal records None
        # instead, so that a missing measurement does not read as a measured 0.
        gain_ppm = None if gain is None else max(min(round(gain * limits.PPM), 2**62), -(2**62))
        accuracy_delta_ppm = None
        before = getattr(evaluation, "accuracy_before", None)
        after = getattr(evaluation, "accuracy_after", None)
        if before is not None and after is not None:
            accuracy_delta_ppm = round((after - before) * limits.PPM)
        receipt = sign_receipt(
            Receipt(
                deal_id=record.deal_id,
                seller=record.terms.seller,
                buyer=record.terms.buyer,
                outcome=outcome,
                amount=record.price if outcome == Outcome.PAID else 0,
                reason=reason,
                gain_ppm=gain_ppm or 0,
                accuracy_delta_ppm=accuracy_delta_ppm or 0,
                created_ms=trades.now_ms(),
                buyer_signature=UNSIGNED,
                seller_signature=b"",
            ),
            trades.signer,
        )
        event = DealEvent.SIGN_PAID if outcome == Outcome.PAID else DealEvent.SIGN_REFUSAL
        fields: dict[str, Any] = {"receipt": receipt, "gain_ppm": gain_ppm, "accuracy_delta_ppm": accuracy_delta_ppm}
        if outcome == Outcome.REFUSED:
            fields.update(reason=reason.name.lower(), detail=detail)
        if model:
            fields.update(model=model, model_version=model_version)
        trades.deals.apply(record.deal_id, event, now_ms=trades.now_ms(), **fields)
        self.progress.setdefault(record.deal_id, Progress()).add_phase("receipt", time.perf_counter() - started)
        logger.info("Deal %s: signed a receipt that %s %d", record.deal_id.hex()[:12],
                    "pays" if outcome == Outcome.PAID else "refuses, paying", receipt.amount)

    # Settling ---------------------------------------------------------------------------

    async def _settle(self, record: DealRecord) -> bool:
        """Send the receipt until countersigned; False if the seller refuses it for good."""
        trades = self.trades
        receipt = record.receipt
        assert receipt is not None
        started = time.perf_counter()
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                io = await trades.open_stream(record.counterparty, trades.SETTLE)
                try:
                    await io.send(receipt)
                    reply = await io.expect(Receipt, timeout=CHUNK_TIMEOUT_S)
                finally:
                    await io.close()
                verify_receipt(reply)
                if dataclasses.replace(reply, seller_signature=b"") != dataclasses.replace(receipt, seller_signature=b""):
                    raise RemoteProtocolError(Reason.TERMS_MISMATCH, "the countersigned receipt differs from the one sent")
                self._record_settlement(record, reply)
                progress = self.progress.setdefault(record.deal_id, Progress())
                progress.add_phase("receipt", time.perf_counter() - started)
                logger.info("Deal %s phases: %s", record.deal_id.hex()[:12],
                            ", ".join(f"{name} {seconds:.3f} s" for name, seconds in progress.phases.items()))
                return True
            except PeerError as exc:
                trades.deals.update(record.deal_id, now_ms=trades.now_ms(), detail=f"seller refused the receipt: {exc}")
                logger.warning("Seller refused the receipt of deal %s: %s", record.deal_id.hex()[:12], exc)
                return False
            except (StreamFailed, RemoteProtocolError) as exc:
                delay = min(0.5 * 2**attempt, 15.0)
                logger.info("Settling deal %s failed (%s); retry %d in %.1f s", record.deal_id.hex()[:12], exc, attempt, delay)
                await trio.sleep(delay)
        logger.warning("Deal %s is still unsettled after %d attempts; it resumes when the node restarts",
                       record.deal_id.hex()[:12], SETTLE_ATTEMPTS)
        return False

    def _record_settlement(self, record: DealRecord, countersigned: Receipt) -> None:
        trades = self.trades
        now = trades.now_ms()
        try:
            with trades.db.transaction() as connection:
                trades.ledger.append(connection, countersigned, now)
                trades.deals.apply(record.deal_id, DealEvent.COUNTERSIGNED, now_ms=now, connection=connection,
                                   receipt=countersigned)
        except LedgerConflict as exc:
            logger.error("Deal %s: %s", record.deal_id.hex()[:12], exc)
            return
        outcome = countersigned.outcome.name.lower()
        trades.metrics.trades.labels(role="buyer", outcome=outcome).inc()
        logger.info("Deal %s settled: %s %d to %s", record.deal_id.hex()[:12], outcome, countersigned.amount,
                    record.counterparty.hex()[-12:])
        manifest = trades.deals.manifest_of(record)
        incoming = trades.data_dir.models / ".incoming" / f"{record.deal_id.hex()}.safetensors"
        incoming.unlink(missing_ok=True)
        if manifest is not None:
            trades.chunks.remove(manifest)


def _most_telling(group: BaseExceptionGroup) -> BaseException:
    """Pick the exception of a task group that explains the failure best.

    A failed deal outranks a protocol error, which outranks a broken stream
    (which the other failures usually cause).
    """
    return most_telling(group, (TradeFailed, RemoteProtocolError, PeerError, StreamFailed))


def _ranges(indices: list[int]) -> tuple[tuple[int, int], ...]:
    """Coalesce sorted chunk indices into (first, count) ranges."""
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and ranges[-1][0] + ranges[-1][1] == index:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            ranges.append((index, 1))
    return tuple(ranges[: limits.MAX_CHUNK_RANGES])


def _rejection_message(reject: Reject, *, bid: int, ask: int) -> str:
    """Return the message for a seller's reject of this node's bid, with what to do about a price."""
    message = f"the seller rejected the bid of {bid}: {reject.detail}"
    if reject.reason != Reason.PRICE_BELOW_RESERVE:
        return message
    if bid < ask:
        return f"{message}; the offer asks {ask}, so raise --max-price (up to {ask}) to buy"
    return (
        f"{message}; the bid already meets the offer's ask of {ask}, so this seller asks more of this node "
        f"(a seller may charge its competitors more): raise --max-price above {ask} or buy from another seller"
    )


def _outcome_for(record: DealRecord, decision: str, gain: float | None) -> Outcome:
    """Pay as the terms require: on delivery always, on gain only at or above the minimum."""
    if record.terms.payment == PaymentTerms.DELIVERY:
        return Outcome.PAID
    gain_ppm = 0 if gain is None else round(gain * limits.PPM)
    if decision == "outright":
        return Outcome.PAID
    return Outcome.PAID if gain_ppm >= record.terms.min_gain_ppm else Outcome.REFUSED

