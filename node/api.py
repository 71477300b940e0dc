"""Handlers of the control API, one per route; views of node state as JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from node.control import ApiError
from protocol.identity import peer_id_to_text
from protocol.offers import ValidOffer

if TYPE_CHECKING:
    from node.daemon import Node


def offer_view(valid: ValidOffer, received_ms: int | None) -> dict[str, Any]:
    offer = valid.offer
    return {
        "offer_id": valid.offer_id.hex(),
        "seller": peer_id_to_text(offer.seller),
        "family": offer.family.hex(),
        "offer_key": offer.offer_key,
        "task": offer.task,
        "tensors": list(offer.tensors),
        "total_bytes": offer.total_bytes,
        "price": offer.price,
        "payment": offer.payment.name.lower(),
        "min_gain_ppm": offer.min_gain_ppm,
        "metrics": {name: value for name, value in offer.metrics},
        "seq": offer.seq,
        "created_ms": offer.created_ms,
        "expires_ms": offer.expires_ms,
        "received_ms": received_ms,
    }


def parse_family(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        family = bytes.fromhex(text)
    except ValueError:
        family = b""
    if len(family) != 32:
        raise ApiError(400, f"family {text!r} must be 64 hex digits")
    return family


def routes(node: Node) -> list[tuple[str, str, Callable[[Request], Awaitable[Any]]]]:
    async def status(request: Request) -> Any:
        return node.status()

    async def peers(request: Request) -> Any:
        peerstore = node.host.get_peerstore()
        result = []
        for peer in node.host.get_connected_peers():
            result.append({"peer_id": str(peer), "addrs": [str(a) for a in peerstore.addrs(peer)]})
        return sorted(result, key=lambda p: p["peer_id"])

    async def offers(request: Request) -> Any:
        family = parse_family(request.query_params.get("family"))
        now = node.now_ms()
        live = node.gossip.book.live(now, [family] if family is not None else None)
        views = [offer_view(v, node.gossip.received_ms.get(v.offer_id)) for v in live]
        return sorted(views, key=lambda v: (v["family"], v["seller"], v["offer_key"]))

    async def stop(request: Request) -> Any:
        node.request_stop(delay=0.1)
        return {"stopping": True, "peer_id": node.peer_id_text}

    return [
        ("GET", "/v1/status", status),
        ("GET", "/v1/peers", peers),
        ("GET", "/v1/offers", offers),
        ("POST", "/v1/stop", stop),
    ]
