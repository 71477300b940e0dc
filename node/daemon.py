"""The node: one organization's long-running pmarket daemon.

`Node.run` starts the libp2p host, offer gossip, the connector that keeps
bootstrap peers connected, the control API and, when enabled, the
Prometheus endpoint. It returns when `request_stop` is called or its scope
is cancelled. Tests run several nodes in one trio process through the same
API; `pmarket node start` runs one in the foreground.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from node.agent import MarketAgent
from node.chunks import ChunkStore
from node.config import Config
from node.control import serve_control
from node.datadir import DataDir, Identity
from node.gossip import OfferGossip
from node.host import ConnectionEvents, Connector, build_host
from node.logs import RateLimiter
from node.metrics import Metrics
from node.models import ModelStore, ModelVersion
from node.publish import OfferRequest, PublishedOffer, Publisher
from node.store import Database
from node.streams import InboundLimiter
from node.trades import Trades
from node.workers import WorkerPool
from protocol.errors import RemoteProtocolError
from protocol.identity import peer_id_to_text
from protocol.messages import Offer
from protocol.offers import ValidOffer

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


@dataclass
class NodeOptions:
    """Start-time options that override config.toml."""

    listen: list[str] | None = None
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool | None = None
    control: bool = True
    clock_offset_ms: int = 0  # tests shift the node's wall clock with this


class Node:
    def __init__(self, data_dir: DataDir, config: Config, identity: Identity, options: NodeOptions | None = None) -> None:
        self.data_dir = data_dir
        self.config = config
        self.identity = identity
        self.options = options or NodeOptions()
        if self.options.mdns is not None:
            config.node.mdns = self.options.mdns
        self.metrics = Metrics()
        self.limiter = InboundLimiter(config.limits.max_inbound_streams_per_peer)
        listen = self.options.listen or config.node.listen
        self.host = build_host(identity, config, listen)
        self._listen = [multiaddr.Multiaddr(address) for address in listen]
        self.gossip = OfferGossip(
            self.host, config=config.gossip, metrics=self.metrics, now_ms=self.now_ms, limiter=self.limiter
        )
        self.db = Database(data_dir.database)
        self.models = ModelStore(data_dir.models, self.db, chunk_size=config.transfer.chunk_size)
        self.chunks = ChunkStore(data_dir.chunks)
        self.publisher = Publisher(self.db, self.models, identity.signer, chunk_size=config.transfer.chunk_size)
        self.workers = WorkerPool(config.workers.device)
        self.trades = Trades(
            host=self.host,
            data_dir=data_dir,
            config=config,
            signer=identity.signer,
            db=self.db,
            models=self.models,
            chunks=self.chunks,
            publisher=self.publisher,
            workers=self.workers,
            book=self.gossip.book,
            metrics=self.metrics,
            now_ms=self.now_ms,
            limiter=self.limiter,
        )
        self.agent = MarketAgent(self)
        self.connector = Connector(
            self.host, [*config.node.bootstrap, *self.options.bootstrap], discover_from_peerstore=config.node.mdns
        )
        self.host.get_network().register_notifee(ConnectionEvents(self._on_connected, self._on_disconnected))
        self.started = trio.Event()
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._log_limit = RateLimiter()
        self._started_at = time.time()

    # Identity and time ------------------------------------------------------

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    @property
    def peer_id_text(self) -> str:
        return peer_id_to_text(self.identity.peer_id)

    def now_ms(self) -> int:
        """Wall-clock milliseconds, the time base of every signed message."""
        return int(time.time() * 1000) + self.options.clock_offset_ms

    def addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<peer ID>) that other nodes can dial."""
        return [str(address) for address in self.host.get_addrs()]

    # Lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        old_umask = os.umask(0o077)
        try:
            async with self.host.run(self._listen):
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self.gossip.run)
                    for family in {v.family for v in self.models.list()}:
                        await self.gossip.join_family(family)
                    await self._announce_stored_offers()
                    await nursery.start(self.trades.run)
                    nursery.start_soon(self.connector.run)
                    if self.config.agent.enabled:
                        nursery.start_soon(self.agent.run_forever)
                    if self.options.control:
                        await nursery.start(serve_control, self, self.data_dir.control_socket)
                    if self.config.metrics.prometheus:
                        self.metrics.serve(self.config.metrics.port)
                    logger.info("Node %s started, listening on %s", self.peer_id_text, ", ".join(self.addrs()))
                    self.started.set()
                    task_status.started()
                    await self._stop.wait()
                    logger.info("Node %s stopping", self.peer_id_text)
                    nursery.cancel_scope.cancel()
        finally:
            self.metrics.close()
            self.db.close()
            if self.options.control:
                try:
                    self.data_dir.control_socket.unlink()
                except FileNotFoundError:
                    pass
            os.umask(old_umask)
            logger.info("Node %s stopped", self.peer_id_text)

    def request_stop(self, *, delay: float = 0.0) -> None:
        """Stop the node, after `delay` seconds (so a control API reply can go out first)."""
        if delay <= 0 or self._nursery is None:
            self._stop.set()
            return

        async def stop_later() -> None:
            await trio.sleep(delay)
            self._stop.set()

        self._nursery.start_soon(stop_later)

    # Connections -----------------------------------------------------------------

    def _on_connected(self, peer: ID) -> None:
        peers = self.host.get_connected_peers()
        if len(peers) > self.config.limits.max_connections and peer not in self.connector.wanted:
            if self._log_limit.allow("connection limit"):
                logger.info("Closing connection from %s: %d peers is the limit", peer, self.config.limits.max_connections)
            if self._nursery is not None:
                self._nursery.start_soon(self.disconnect, peer)
            return
        logger.info("Connected to %s", peer)
        self.metrics.peers.set(len(peers))
        self.gossip.on_connected(peer)

    def _on_disconnected(self, peer: ID) -> None:
        logger.info("Disconnected from %s", peer)
        self.metrics.peers.set(len(self.host.get_connected_peers()))

    async def connect(self, address: str) -> ID:
        """Dial a full multiaddr ending in /p2p/<peer ID>."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        await self.host.connect(info)
        return info.peer_id

    async def disconnect(self, peer: ID) -> None:
        try:
            await self.host.get_network().close_peer(peer)
        except Exception as exc:  # py-libp2p raises assorted errors for a connection already closing
            logger.debug("Closing connection to %s failed: %s", peer, exc)

    # Offers -------------------------------------------------------------------

    async def publish_offer(self, offer: Offer) -> ValidOffer:
        """Publish one of this node's offers (signed by its key)."""
        await self.gossip.join_family(offer.family)
        valid = await self.gossip.publish(offer)
        logger.info("Published offer %s (%s, seq %d)", valid.offer_id.hex()[:12], offer.offer_key, offer.seq)
        return valid

    async def _announce_stored_offers(self) -> None:
        """Put this node's unexpired offers from the database back in the book and gossip them.

        Only the newest offer per (family, offer key) goes out, because the
        book keeps only that one. Run at start, so offers outlive a restart.
        """
        newest: dict[tuple[bytes, str], Offer] = {}
        for published in self.publisher.live(self.now_ms()):
            offer = published.offer
            key = (offer.family, offer.offer_key)
            if key not in newest or offer.seq > newest[key].seq:
                newest[key] = offer
        for offer in newest.values():
            try:
                await self.publish_offer(offer)
            except RemoteProtocolError as exc:
                logger.warning("Stored offer %s not announced again: %s", offer.offer_id.hex()[:12], exc)

    async def publish(self, request: OfferRequest) -> PublishedOffer:
        """Sign an offer for a local model and gossip it."""
        market = self.config.market
        published = await trio.to_thread.run_sync(
            lambda: self.publisher.prepare(request, now_ms=self.now_ms(), reserve_fraction=market.reserve_fraction)
        )
        await self.publish_offer(published.offer)
        return published

    # Models and training --------------------------------------------------------

    def _task_data(self) -> Any:
        from node.evaluate import local_task_data
        from node.models import ModelError

        data = local_task_data(self.config.task)
        if data is None:
            raise ModelError("this node has no task; set [task] name in config.toml (for example \"digits\")")
        return data

    def org_seed(self) -> int:
        """This organization's seed: models of different organizations start apart."""
        return self.config.task.seed * 1000 + self.config.task.index

    async def init_model(self, name: str, *, epochs: int = 0, seed: int | None = None) -> ModelVersion:
        """Create a model of this node's task from fresh weights, then train it."""
        data = self._task_data()
        params = data.task.initial_params(self.org_seed() if seed is None else seed)
        version = await trio.to_thread.run_sync(
            lambda: self.models.add_tensors(name, params, task=data.task.name, source="init", parent=None,
                                            deal_id=None, metrics={"epochs": 0.0}, now_ms=self.now_ms())
        )
        await self.gossip.join_family(version.family)
        if epochs:
            version = await self.train_model(version.ref, epochs=epochs)
        return version

    async def train_model(self, ref: str, *, epochs: int = 1) -> ModelVersion:
        """Train a model on this node's shard for `epochs` epochs; store one new version."""
        from node.models import ModelError

        data = self._task_data()
        version = self.models.get(ref)
        if version.task != data.task.name:
            raise ModelError(f"model {version.ref} is for task {version.task!r}; this node's task is {data.task.name!r}")
        params = self.models.load_tensors(version)
        done = int(version.metrics.get("epochs", 0))
        for epoch in range(done, done + epochs):
            params = await self.workers.run(functools.partial(
                _train_one_epoch, data.task, params, data.train, epoch, self.org_seed()
            ))
        metrics = await self.workers.run(lambda device: data.task.evaluate(params, data.validation, device=device))
        return await trio.to_thread.run_sync(
            lambda: self.models.add_tensors(
                version.name, params, task=version.task, source="train", parent=version.version, deal_id=None,
                metrics={"epochs": float(done + epochs), "val_loss": metrics.loss, "val_accuracy": metrics.accuracy},
                now_ms=self.now_ms(),
            )
        )

    def status(self) -> dict[str, Any]:
        versions = self.models.list()
        return {
            "peer_id": self.peer_id_text,
            "version": VERSION,
            "addrs": self.addrs(),
            "data_dir": str(self.data_dir.root),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self._started_at, 1),
            "peers": len(self.host.get_connected_peers()),
            "offers": len(self.gossip.book),
            "offers_accepted": self.metrics.accepted_by_via(),
            "offers_rejected": self.metrics.rejected_by_reason(),
            "models": len({v.name for v in versions}),
            "model_versions": len(versions),
            "deals_open": sum(1 for d in self.trades.deals.list() if not d.terminal),
            "balance": sum(self.trades.ledger.balances().values()),
            "metrics_port": self.metrics.port,
        }


def _train_one_epoch(task: Any, params: Any, shard: Any, epoch: int, seed: int, device: str) -> Any:
    from node.evaluate import train_job

    return train_job(task, params, shard, epoch=epoch, seed=seed, device=device)
