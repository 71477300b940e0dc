"""The check of listen addresses before a node starts, against real loopback sockets."""

from __future__ import annotations

import socket

import pytest

from node.host import ListenError, check_listen_addrs


def test_free_and_any_port_pass() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    check_listen_addrs([f"/ip4/127.0.0.1/tcp/{port}", "/ip4/127.0.0.1/tcp/0"])


def test_port_in_use_is_rejected() -> None:
    # py-libp2p listens with SO_REUSEPORT, so the holder sets it too.
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        with pytest.raises(ListenError) as caught:
            check_listen_addrs([f"/ip4/127.0.0.1/tcp/{port}"])

    assert f"port {port} is already in use" in str(caught.value)
    assert "/tcp/0" in str(caught.value)


def test_foreign_ip_is_rejected() -> None:
    # 192.0.2.1 is reserved for documentation, so no machine has it; binding sends nothing.
    with pytest.raises(ListenError) as caught:
        check_listen_addrs(["/ip4/192.0.2.1/tcp/0"])

    assert "192.0.2.1 is not an address of this machine" in str(caught.value)


@pytest.mark.parametrize("text", ["/ip4/127.0.0.1/udp/4001", "/ip4/127.0.0.1/tcp/4001/ws", "/dns4/localhost/tcp/4001"])
def test_other_transports_are_rejected(text: str) -> None:
    with pytest.raises(ListenError) as caught:
        check_listen_addrs([text])

    assert text in str(caught.value)
    assert "/ip4/127.0.0.1/tcp/4001" in str(caught.value)
