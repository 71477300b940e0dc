"""Trades between this node and its peers, buyer and seller side.

`Trades` owns the three stream protocols of a trade and the state they
share: the deal book, the ledger, the chunk store and the local models.
`node.seller` answers bids, serves chunks and countersigns receipts;
`node.buyer` runs this node's purchases. On start, purchases that a crash or
a stop interrupted resume from their stored state, and a sweep expires deals
whose time is up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.buyer import Buyer
from node.chunks import ChunkStore
from node.config import Config
from node.datadir import DataDir
from node.deals import DealBook, Ledger
from node.logs import RateLimiter
from node.metrics import Metrics
from node.models import ModelStore
from node.publish import Publisher
from node.seller import Seller
from node.store import Database
from node.streams import InboundLimiter, StreamFailed, StreamIO
from node.workers import WorkerPool
from protocol.deal import EXPIRING, DealEvent, DealState
from protocol.errors import RemoteProtocolError
from protocol.identity import Signer
from protocol.messages import Role
from protocol.offers import OfferBook

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 2.0
RESUME_STATES = {
    DealState.AGREED,
    DealState.TRANSFERRING,
    DealState.EVALUATING,
    DealState.SETTLING_PAID,
    DealState.SETTLING_REFUSED,
}


class TradeHooks:
    """Points where tests make a node misbehave like a cheating peer.

    The defaults change nothing.
    """

    def outgoing_chunk(self, deal_id: bytes, index: int, data: memoryview) -> bytes | memoryview:
        return data

    def cut_chunk(self, deal_id: bytes, index: int) -> int | None:
        """Bytes of this chunk to send before the stream breaks; None sends it whole."""
        return None

    def received_chunk(self, deal_id: bytes, index: int) -> None:
        pass


class Trades:
    NEGOTIATE = TProtocol("/pmarket/negotiate/1.0.0")
    TRANSFER = TProtocol("/pmarket/transfer/1.0.0")
    SETTLE = TProtocol("/pmarket/settle/1.0.0")

    def __init__(
        self,
        *,
        host: Any,
        data_dir: DataDir,
        config: Config,
        signer: Signer,
        db: Database,
        models: ModelStore,
        chunks: ChunkStore,
        publisher: Publisher,
        workers: WorkerPool,
        book: OfferBook,
        metrics: Metrics,
        now_ms: Callable[[], int],
        limiter: InboundLimiter,
    ) -> None:
        self.host = host
        self.data_dir = data_dir
        self.config = config
        self.signer = signer
        self.db = db
        self.models = models
        self.chunks = chunks
        self.publisher = publisher
        self.workers = workers
        self.book = book
        self.metrics = metrics
        self.now_ms = now_ms
        self.deals = DealBook(db)
        self.ledger = Ledger(db, signer.peer_id)
        self.hooks = TradeHooks()
        self.seller = Seller(self)
        self.buyer = Buyer(self)
        self._nursery: trio.Nursery | None = None
        self._log_limit = RateLimiter()
        host.set_stream_handler(self.NEGOTIATE, limiter.wrap(self.seller.serve_negotiation, "negotiation"))
        host.set_stream_handler(self.TRANSFER, limiter.wrap(self.seller.serve_transfer, "transfer"))
        host.set_stream_handler(self.SETTLE, limiter.wrap(self.seller.serve_settlement, "settlement"))

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("Trades.run() has not started")
        return self._nursery

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            resumed = self.deals.list(role=Role.BUYER, states=RESUME_STATES)
            for record in resumed:
                logger.info("Resuming deal %s (%s)", record.deal_id.hex()[:12], record.state.value)
                self.buyer.start(record.deal_id)
            nursery.start_soon(self._sweep_expired)
            task_status.started()
            await trio.sleep_forever()

    async def _sweep_expired(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            now = self.now_ms()
            for record in self.deals.list():
                if record.state in EXPIRING[record.role] and record.expires_ms <= now:
                    self.deals.apply(record.deal_id, DealEvent.TIMEOUT, now_ms=now, reason="expired")
                    logger.info("Deal %s expired (%s)", record.deal_id.hex()[:12], record.role.name.lower())

    # Streams ---------------------------------------------------------------------

    def stream_io(self, stream: Any) -> StreamIO:
        return StreamIO(stream, on_bytes_in=self.metrics.bytes_in.inc, on_bytes_out=self.metrics.bytes_out.inc)

    async def open_stream(self, peer: bytes, protocol: TProtocol) -> StreamIO:
        """Open a stream to `peer`, dialling it from the peerstore if needed."""
        try:
            with trio.fail_after(20.0):
                stream = await self.host.new_stream(ID(peer), [protocol])
        except trio.TooSlowError:
            raise StreamFailed(f"opening {protocol} to the peer timed out") from None
        except Exception as exc:  # py-libp2p raises many error types for dial and negotiation failures
            raise StreamFailed(f"cannot open {protocol} to the peer: {exc}") from None
        return self.stream_io(stream)

    def log_peer_error(self, what: str, peer: bytes, error: RemoteProtocolError) -> None:
        """Log a peer's protocol error at debug, a few per peer and reason a minute."""
        if self._log_limit.allow((peer, what, error.reason)):
            logger.debug("Rejected %s from %s: %s", what, peer.hex()[-12:], error)
