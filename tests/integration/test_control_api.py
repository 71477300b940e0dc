"""The control API of a node running in this process, over its Unix socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from safetensors.numpy import save_file

from node.client import ControlClient, ControlError
from tests.integration.helpers import start_node, wait_until

pytestmark = pytest.mark.network


async def get(node: Any, path: str) -> Any:
    # The client blocks, and the node serves requests on this trio loop, so the
    # request runs in a thread.
    client = ControlClient(node.data_dir)
    return await trio.to_thread.run_sync(lambda: client.get(path))


async def test_peers_lists_peer_without_addresses(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start_node(nursery, tmp_path, "a")
    b = await start_node(nursery, tmp_path, "b")
    await a.connect(b.addrs()[0])
    await wait_until(lambda: len(b.host.get_connected_peers()) == 1, what="A connected at B")
    # A peer that dialled in can be connected with no peerstore entry.
    b.host.get_peerstore().peer_data_map.pop(a.host.get_id(), None)

    peers = await get(b, "/v1/peers")

    assert [p["peer_id"] for p in peers] == [a.peer_id_text]
    assert peers[0]["addrs"] == []


async def test_peers_lists_stored_addresses(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start_node(nursery, tmp_path, "a")
    b = await start_node(nursery, tmp_path, "b")
    await a.connect(b.addrs()[0])

    peers = await get(a, "/v1/peers")

    assert [p["peer_id"] for p in peers] == [b.peer_id_text]
    assert b.addrs()[0] in peers[0]["addrs"]


async def test_export_existing_file_is_409(nursery: trio.Nursery, tmp_path: Path) -> None:
    node = await start_node(nursery, tmp_path, "a")
    weights = tmp_path / "w.safetensors"
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(weights))
    node.models.import_file(weights, name="m", now_ms=1)
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"keep me")
    client = ControlClient(node.data_dir)
    body = {"model": "m@1", "path": str(dest), "overwrite": False}

    with pytest.raises(ControlError) as caught:
        await trio.to_thread.run_sync(lambda: client.post("/v1/models/export", body))

    assert caught.value.status == 409
    assert str(caught.value) == f"{dest} already exists"
    assert dest.read_bytes() == b"keep me"
