"""Handlers of the control API, one per route; views of node state as JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.peerstore import PeerStoreError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import compile_path

from node.control import ApiError, json_body
from protocol.identity import peer_id_to_text
from protocol.messages import Role
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


def stored_addrs(peerstore: Any, peer: Any) -> list[str]:
    """Return the addresses the peerstore has for `peer`, or an empty list."""
    try:
        return [str(address) for address in peerstore.addrs(peer)]
    except PeerStoreError:
        # py-libp2p 0.8.1 raises this for a peer with no entry or expired
        # addresses, which a peer that dialled this node can be.
        return []


RouteTable = list[tuple[str, str, Callable[[Request], Awaitable[Any]]]]

# Methods for which the catch-all routes return a JSON 404 or 405 (a GET route also serves HEAD).
FALLBACK_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ROUTES_HINT = 'the routes are listed under "The control API" in README.md'


def route_error(method: str, path: str, allowed: Sequence[str], known_paths: Sequence[str] = ()) -> ApiError:
    """Return the error for a request that matches no route: 405 when ``allowed`` lists methods, else 404."""
    if allowed:
        return ApiError(405, f"method {method} is not allowed for {path}, only {', '.join(allowed)}; {ROUTES_HINT}")
    stripped = path.rstrip("/")
    if stripped != path and stripped in known_paths:
        return ApiError(404, f"the control API has no route {method} {path}; did you mean {stripped}? {ROUTES_HINT}")
    return ApiError(404, f"the control API has no route {method} {path}; {ROUTES_HINT}")


def fallback_routes(table: RouteTable) -> RouteTable:
    """Return catch-all routes, placed last, that turn an unknown path or method into a JSON error.

    Starlette's own 404 and 405 responses are plain text, while every error
    of this API is ``{"error": message}``.
    """
    known = [(method, compile_path(path)[0]) for method, path, _ in table]
    plain_paths = [path for _, path, _ in table if "{" not in path]

    async def unmatched(request: Request) -> Any:
        path = request.url.path
        allowed = sorted({method for method, regex in known if regex.match(path)})
        raise route_error(request.method, path, allowed, plain_paths)

    return [(method, "/{path:path}", unmatched) for method in FALLBACK_METHODS]


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Return an HTTPException as ``{"error": message}``, like every other error of this API.

    This is a Starlette exception handler: pass it to the app as
    ``Starlette(..., exception_handlers={HTTPException: http_error})``. It
    covers the 404 and 405 of methods that `fallback_routes` does not serve.
    """
    if not isinstance(exc, HTTPException):
        raise exc
    method, path = request.method, request.url.path
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = route_error(method, path, ()).message
    elif exc.status_code == 405:
        allowed = sorted(m.strip() for m in headers.get("Allow", "").split(",") if m.strip())
        message = route_error(method, path, allowed).message
    else:
        message = f"{method} {path} failed: {exc.detail}; {ROUTES_HINT}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=headers)


def routes(node: Node) -> RouteTable:
    async def status(request: Request) -> Any:
        return node.status()

    async def peers(request: Request) -> Any:
        peerstore = node.host.get_peerstore()
        result = []
        for peer in node.host.get_connected_peers():
            result.append({"peer_id": str(peer), "addrs": stored_addrs(peerstore, peer)})
        return sorted(result, key=lambda p: p["peer_id"])

    async def offers(request: Request) -> Any:
        family = parse_family(request.query_params.get("family"))
        now = node.now_ms()
        live = node.gossip.book.live(now, [family] if family is not None else None)
        views = [offer_view(v, node.gossip.received_ms.get(v.offer_id)) for v in live]
        return sorted(views, key=lambda v: (v["family"], v["seller"], v["offer_key"]))

    async def connect(request: Request) -> Any:
        body = await json_body(request)
        address = _str(body, "address")
        try:
            peer = await node.connect(address)
        except Exception as exc:  # py-libp2p and multiaddr raise many unrelated types
            raise ApiError(400, f"cannot connect to {address}: {exc}") from None
        return {"peer_id": str(peer)}

    async def stop(request: Request) -> Any:
        node.request_stop(delay=0.1)
        return {"stopping": True, "peer_id": node.peer_id_text}

    table: RouteTable = [
        ("GET", "/v1/status", status),
        ("GET", "/v1/peers", peers),
        ("GET", "/v1/offers", offers),
        ("POST", "/v1/connect", connect),
        ("POST", "/v1/stop", stop),
        *trade_routes(node),
    ]
    return [*table, *fallback_routes(table)]


def model_view(version: Any) -> dict[str, Any]:
    return {
        "name": version.name,
        "version": version.version,
        "ref": version.ref,
        "task": version.task,
        "family": version.family.hex(),
        "root": version.root.hex(),
        "total_bytes": version.total_bytes,
        "source": version.source,
        "parent": version.parent,
        "deal_id": version.deal_id.hex() if version.deal_id else None,
        "created_ms": version.created_ms,
        "metrics": version.metrics,
        "path": str(version.path),
    }


def _int(body: dict[str, Any], key: str, *, default: int | None = None, minimum: int = 0) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise ApiError(400, f"{key} must be an integer of at least {minimum}, got {value!r}")
    return value


def _str(body: dict[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, f"{key} must be a non-empty string, got {value!r}")
    return value


def trade_routes(node: Node) -> RouteTable:
    from node.buyer import BuyError
    from node.models import DestinationExists, ModelError
    from node.publish import OfferRequest, PublishError, parse_terms

    async def models(request: Request) -> Any:
        return [model_view(v) for v in node.models.list()]

    async def import_model(request: Request) -> Any:
        body = await json_body(request)
        path, name = _str(body, "path"), _str(body, "name")
        task = _str(body, "task", required=False)
        try:
            version = await trio.to_thread.run_sync(
                lambda: node.models.import_file(Path(path), name=name, task=task, now_ms=node.now_ms())
            )
        except ModelError as exc:
            raise ApiError(400, str(exc)) from None
        await node.gossip.join_family(version.family)
        return model_view(version)

    async def export_model(request: Request) -> Any:
        body = await json_body(request)
        ref, path = _str(body, "model"), _str(body, "path")
        overwrite = bool(body.get("overwrite", False))
        try:
            written = await trio.to_thread.run_sync(lambda: node.models.export(ref, Path(path), overwrite=overwrite))
        except DestinationExists as exc:
            # 409: the file exists, and "overwrite": true would replace it.
            raise ApiError(409, f"{exc.path} already exists") from None
        except ModelError as exc:
            raise ApiError(400, str(exc)) from None
        return {"model": ref, "path": str(written)}

    async def init_model(request: Request) -> Any:
        body = await json_body(request)
        try:
            version = await node.init_model(
                _str(body, "name"),
                epochs=_int(body, "epochs", default=0) or 0,
                seed=_int(body, "seed", default=None),
            )
        except ModelError as exc:
            raise ApiError(400, str(exc)) from None
        return model_view(version)

    async def train_model(request: Request) -> Any:
        body = await json_body(request)
        try:
            version = await node.train_model(_str(body, "model"), epochs=_int(body, "epochs", default=1, minimum=1) or 1)
        except ModelError as exc:
            raise ApiError(400, str(exc)) from None
        return model_view(version)

    async def publish(request: Request) -> Any:
        body = await json_body(request)
        try:
            payment, min_gain_ppm = parse_terms(_str(body, "terms", required=False, default="delivery"))
            tensors = body.get("tensors", [])
            if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
                raise ApiError(400, "tensors must be a list of name patterns")
            expires = body.get("expires_s", 3600.0)
            if not isinstance(expires, (int, float)) or isinstance(expires, bool):
                raise ApiError(400, f"expires_s must be a number of seconds, got {expires!r}")
            offer_request = OfferRequest(
                model=_str(body, "model"),
                price=_int(body, "price") or 0,
                reserve=_int(body, "reserve", default=None),
                tensors=tuple(tensors),
                expires_s=float(expires),
                payment=payment,
                min_gain_ppm=min_gain_ppm,
            )
            published = await node.publish(offer_request)
        except (ModelError, PublishError) as exc:
            raise ApiError(400, str(exc)) from None
        return offer_view(node.gossip.book.get(published.offer_id) or _valid(published), node.now_ms())

    async def buy(request: Request) -> Any:
        body = await json_body(request)
        prefix = _str(body, "offer").lower()
        matches = node.gossip.book.find_prefix(prefix)
        live = [v for v in matches if v.offer.expires_ms > node.now_ms()]
        if not live:
            raise ApiError(404, f"no live offer with ID {prefix!r} in the offer book; see `pmarket offers`")
        if len(live) > 1:
            raise ApiError(400, f"offer ID {prefix!r} is ambiguous ({len(live)} offers); give more digits")
        try:
            record = await node.trades.buyer.buy(live[0], max_price=_int(body, "max_price", default=None))
        except BuyError as exc:
            raise ApiError(409, str(exc)) from None
        return deal_view(node, record)

    async def deals(request: Request) -> Any:
        return [deal_view(node, record) for record in node.trades.deals.list()]

    async def deal(request: Request) -> Any:
        prefix = request.path_params["deal_id"].lower()
        # Only hex digits, so that SQL LIKE wildcards in the prefix match nothing.
        matches = node.trades.deals.find_prefix(prefix) if _is_hex(prefix) else []
        if not matches:
            raise ApiError(
                404, f"no deal matches {prefix!r}; deal IDs are hexadecimal, and `pmarket deals` lists them"
            )
        if len(matches) > 1:
            raise ApiError(400, f"{len(matches)} deals match {prefix!r}; give a longer deal ID")
        return deal_view(node, matches[0])

    async def ledger(request: Request) -> Any:
        from protocol.ledger import ChainError

        try:
            node.trades.ledger.verify()
            chain = "ok"
        except ChainError as exc:
            chain = f"broken: {exc}"
        earned, spent = node.trades.ledger.totals()
        balances = {peer_id_to_text(peer): amount for peer, amount in node.trades.ledger.balances().items()}
        entries = [_unmeasured_as_null(node, entry) for entry in node.trades.ledger.export()]
        return {"entries": entries, "balances": balances, "earned": earned, "spent": spent, "chain": chain}

    async def agent_round(request: Request) -> Any:
        body = await json_body(request)
        round_index = _int(body, "round") or 0
        phase = _str(body, "phase", required=False, default="both")
        try:
            if phase == "prepare":
                report = await node.agent.prepare(round_index)
            elif phase == "trade":
                report = await node.agent.trade(round_index)
            elif phase == "both":
                report = await node.agent.run_round(round_index)
            else:
                raise ApiError(400, f"phase {phase!r} must be prepare, trade or both")
        except ModelError as exc:
            raise ApiError(400, str(exc)) from None
        return report.view()

    async def agent_status(request: Request) -> Any:
        budget = node.agent.budget
        return {
            "enabled": node.config.agent.enabled,
            "model": node.config.agent.model,
            "rounds_traded": node.agent.rounds_done,
            "budget": {"total": budget.total, "per_round": budget.per_round, "spent": budget.spent,
                       "available": budget.available()},
            "last_ask": node.agent.last_ask,
        }

    return [
        ("POST", "/v1/agent/round", agent_round),
        ("GET", "/v1/agent", agent_status),
        ("GET", "/v1/models", models),
        ("POST", "/v1/models/import", import_model),
        ("POST", "/v1/models/export", export_model),
        ("POST", "/v1/models/init", init_model),
        ("POST", "/v1/models/train", train_model),
        ("POST", "/v1/offers", publish),
        ("POST", "/v1/buy", buy),
        ("GET", "/v1/deals", deals),
        ("GET", "/v1/deals/{deal_id}", deal),
        ("GET", "/v1/ledger", ledger),
    ]


def deal_view(node: Node, record: Any) -> dict[str, Any]:
    view: dict[str, Any] = record.view()
    progress = node.trades.buyer.progress.get(record.deal_id)
    if progress is not None and not record.terminal:
        view["chunks_total"] = progress.chunks_total
        view["chunks_done"] = progress.chunks_done
        view["bytes_done"] = progress.bytes_done
    if progress is not None:
        view["phases"] = {name: round(seconds, 4) for name, seconds in progress.phases.items()}
    return view


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _unmeasured_as_null(node: Node, entry: dict[str, Any]) -> dict[str, Any]:
    """Return a ledger entry with null for a gain that this node's purchase did not measure.

    A receipt carries 0 for a gain or accuracy change that the buyer did not
    measure, in an outright purchase for example. The buyer's deal records
    None then, so its ledger view shows null, as its deal view does. The
    signed receipt, in ``receipt``, keeps its 0.
    """
    record = node.trades.deals.get(bytes.fromhex(entry["deal_id"]))
    if record is None or record.role is not Role.BUYER:
        return entry
    if record.gain_ppm is None:
        entry["gain_ppm"] = None
    if record.accuracy_delta_ppm is None:
        entry["accuracy_delta_ppm"] = None
    return entry


def _valid(published: Any) -> ValidOffer:
    from protocol.codec import encode

    return ValidOffer(published.offer, published.offer_id, encode(published.offer))
