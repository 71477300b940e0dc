"""Prometheus metrics of one node, served on 127.0.0.1 when enabled.

Each node has its own registry, so several nodes in one process (tests)
keep separate counts.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

logger = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.peers = Gauge("pmarket_peers", "Connected peers", registry=self.registry)
        self.offers_in_book = Gauge("pmarket_offers_in_book", "Offers in the offer book", registry=self.registry)
        self.offers_seen = Counter(
            "pmarket_offers_seen", "Offers received, by gossip or catch-up pull", ["via"], registry=self.registry
        )
        self.offers_accepted = Counter(
            "pmarket_offers_accepted", "Offers that passed validation", ["via"], registry=self.registry
        )
        self.offers_rejected = Counter(
            "pmarket_offers_rejected", "Offers rejected, by reason", ["reason"], registry=self.registry
        )
        self.bytes_in = Counter("pmarket_bytes_in", "Bytes received on pmarket streams and topics", registry=self.registry)
        self.bytes_out = Counter("pmarket_bytes_out", "Bytes sent on pmarket streams and topics", registry=self.registry)
        self.trades = Counter("pmarket_trades", "Finished deals by role and outcome", ["role", "outcome"], registry=self.registry)
        self._server: Any = None
        self.port: int | None = None

    def rejected_by_reason(self) -> dict[str, int]:
        return self.by_label(self.offers_rejected, "reason")

    def accepted_by_via(self) -> dict[str, int]:
        """Count accepted offers (new, or replacing an older sequence) by how each arrived: gossip, sync or local."""
        return self.by_label(self.offers_accepted, "via")

    def by_label(self, counter: Counter, label: str) -> dict[str, int]:
        """Sum a labelled counter by the value of `label`."""
        counts: dict[str, int] = {}
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels[label]
                    counts[key] = counts.get(key, 0) + int(sample.value)
        return counts

    def total(self, counter: Counter) -> int:
        total = 0.0
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    total += sample.value
        return int(total)

    def serve(self, port: int) -> int:
        """Start the HTTP endpoint on 127.0.0.1 and return its port."""
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._server = server
        self.port = int(server.server_address[1])
        logger.info("Prometheus metrics on http://127.0.0.1:%d/metrics", self.port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
