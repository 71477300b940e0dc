"""The control API client against sockets that fail in the ways a dying daemon does."""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.client import ControlClient, ControlError, DaemonGone, NoDaemon
from node.datadir import DataDir


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A Unix socket path must stay under about 100 bytes, and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="pm-") as folder:
        yield Path(folder)


def serve_once(path: Path, reply: bytes | None) -> threading.Thread:
    """Accept one connection on a Unix socket, read the request, send `reply` (or nothing), close."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                if reply is not None:
                    connection.sendall(reply)
                else:
                    # Reset instead of a clean close, like a process killed by SIGKILL mid-request.
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_missing_socket_is_no_daemon(short_dir: Path) -> None:
    client = ControlClient(DataDir(short_dir))

    with pytest.raises(NoDaemon) as caught:
        client.get("/v1/status")

    assert "pmarket node start --data-dir" in str(caught.value)


def test_connection_reset_is_daemon_gone(short_dir: Path) -> None:
    data_dir = DataDir(short_dir)
    thread = serve_once(data_dir.control_socket, None)
    client = ControlClient(data_dir, timeout=10)

    with pytest.raises(DaemonGone) as caught:
        client.get("/v1/status")
    thread.join(5)

    message = str(caught.value)
    assert "GET /v1/status" in message
    assert str(data_dir.log) in message
    assert "closed the connection" in message


def test_close_without_response_is_daemon_gone(short_dir: Path) -> None:
    data_dir = DataDir(short_dir)
    thread = serve_once(data_dir.control_socket, b"")
    client = ControlClient(data_dir, timeout=10)

    with pytest.raises(DaemonGone):
        client.post("/v1/models/init", {"name": "m"})
    thread.join(5)


def test_response_not_json_is_control_error(short_dir: Path) -> None:
    data_dir = DataDir(short_dir)
    body = b"Not Found"
    reply = b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\n" + body
    thread = serve_once(data_dir.control_socket, reply)
    client = ControlClient(data_dir, timeout=10)

    with pytest.raises(ControlError) as caught:
        client.get("/v1/nope")
    thread.join(5)

    assert "not JSON" in str(caught.value)
    assert "404" in str(caught.value)
