"""Logging for the daemon: a log file in the data directory, and limits on
what peers can make it write."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(level: str, log_file: Path | None, *, stderr: bool = True) -> None:
    """Send pmarket's logs to `log_file` (rotated at 10 MiB) and stderr.

    py-libp2p logs some events that a remote peer triggers (rate-limit hits,
    failed streams) at warning level, so its loggers stay at error unless
    the node runs at debug.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT)
    if log_file is not None:
        file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 2**20, backupCount=3)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    if stderr:
        stream_handler = logging.StreamHandler(sys.stderr)
        stream_handler.setFormatter(formatter)
        root.addHandler(stream_handler)
    numeric = getattr(logging, level.upper())
    root.setLevel(numeric)
    third_party = logging.DEBUG if numeric <= logging.DEBUG else logging.ERROR
    for name in ("libp2p", "multiaddr", "zeroconf", "hypercorn", "httpx", "httpcore", "async_service"):
        logging.getLogger(name).setLevel(third_party)
        # Importing py-libp2p 0.8.1 without LIBP2P_DEBUG sets propagate to False
        # on its logger and adds no handler, so its errors went to stderr bare,
        # without time or level, and never reached the log file.
        logging.getLogger(name).propagate = True


class RateLimiter:
    """Allows at most `burst` events per key in each `period` seconds.

    Log lines that a peer can trigger go through one of these, so a peer
    that misbehaves in a loop costs a few lines, not a full disk.
    """

    def __init__(self, burst: int = 5, period: float = 60.0, max_keys: int = 4096) -> None:
        self.burst = burst
        self.period = period
        self.max_keys = max_keys
        self._windows: dict[object, tuple[float, int]] = {}
        self.suppressed = 0

    def allow(self, key: object, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.period:
            start, count = now, 0
        if count >= self.burst:
            self.suppressed += 1
            return False
        if len(self._windows) >= self.max_keys and key not in self._windows:
            self._windows.clear()
        self._windows[key] = (start, count + 1)
        return True
