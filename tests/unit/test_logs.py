"""Log set-up of the daemon: third-party records reach the log file with pmarket's format."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import libp2p  # noqa: F401  # importing it configures its logger, which setup must undo
import pytest

from node import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_libp2p_errors_reach_log_file(tmp_path: Path, restore_logging: None) -> None:
    log_file = tmp_path / "node.log"
    logs.setup("info", log_file, stderr=False)

    logging.getLogger("libp2p.transport.tcp.tcp").error("Failed to open TCP stream: %s", "refused")
    logging.getLogger("libp2p.transport.tcp.tcp").warning("a warning a peer can trigger")
    for handler in logging.getLogger().handlers:
        handler.flush()

    text = log_file.read_text()
    assert "ERROR" in text
    assert "Failed to open TCP stream: refused" in text
    assert "a warning a peer can trigger" not in text
