"""Errors of the control API: every one is JSON ``{"error": message}``.

The app is the daemon's own (`node.control.build_app`), called in process
through httpx's ASGI transport. The node behind it is a stand-in, because
these requests read none of its state apart from the deal book.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from node import api
from node.control import build_app, endpoint

README_HINT = 'the routes are listed under "The control API" in README.md'


class Deals:
    """A deal book whose every hex prefix matches `matches` deals."""

    def __init__(self, matches: int) -> None:
        self.matches = matches
        self.prefixes: list[str] = []

    def find_prefix(self, prefix: str) -> list[Any]:
        self.prefixes.append(prefix)
        return [object()] * self.matches


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pmarket")


def app_with_deals(deals: Deals) -> Starlette:
    node = SimpleNamespace(trades=SimpleNamespace(deals=deals))
    return build_app(node)  # type: ignore[arg-type]


async def test_unknown_route_is_json_404() -> None:
    async with client_for(app_with_deals(Deals(0))) as client:
        response = await client.get("/v1/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": f"the control API has no route GET /v1/nope; {README_HINT}"}


async def test_unknown_route_with_post() -> None:
    async with client_for(app_with_deals(Deals(0))) as client:
        response = await client.post("/v2/status", json={})
    assert response.status_code == 404
    assert response.json() == {"error": f"the control API has no route POST /v2/status; {README_HINT}"}


async def test_trailing_slash_suggests_the_route() -> None:
    async with client_for(app_with_deals(Deals(0))) as client:
        response = await client.get("/v1/status/")
    assert response.status_code == 404
    assert response.json() == {
        "error": f"the control API has no route GET /v1/status/; did you mean /v1/status? {README_HINT}"
    }


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/v1/status", "GET"),
        ("DELETE", "/v1/models", "GET"),
        ("GET", "/v1/buy", "POST"),
        ("PUT", "/v1/offers", "GET, POST"),
        ("DELETE", "/v1/deals/abc123", "GET"),
    ],
)
async def test_wrong_method_is_json_405(method: str, path: str, allowed: str) -> None:
    async with client_for(app_with_deals(Deals(1))) as client:
        response = await client.request(method, path)
    assert response.status_code == 405
    assert response.json() == {"error": f"method {method} is not allowed for {path}, only {allowed}; {README_HINT}"}


async def test_deal_id_matching_nothing() -> None:
    deals = Deals(0)
    async with client_for(app_with_deals(deals)) as client:
        response = await client.get("/v1/deals/abc")
    assert response.status_code == 404
    assert response.json() == {
        "error": "no deal matches 'abc'; deal IDs are hexadecimal, and `pmarket deals` lists them"
    }
    assert deals.prefixes == ["abc"]


async def test_non_hex_deal_id_not_found() -> None:
    # LIKE wildcards such as '_' must not match every deal.
    deals = Deals(1)
    async with client_for(app_with_deals(deals)) as client:
        for text in ("zzz", "_", "%25"):
            response = await client.get(f"/v1/deals/{text}")
            assert response.status_code == 404
            assert response.json()["error"].startswith("no deal matches ")
    assert deals.prefixes == []


async def test_ambiguous_deal_id_asks_for_more_digits() -> None:
    async with client_for(app_with_deals(Deals(2))) as client:
        response = await client.get("/v1/deals/a")
    assert response.status_code == 400
    assert response.json() == {"error": "2 deals match 'a'; give a longer deal ID"}


async def test_http_error_handler_answers_json() -> None:
    # The handler in an app that registers it: a method that the catch-all
    # routes do not serve, and an HTTPException raised by a route.
    async def status(request: Any) -> Any:
        return {"ok": True}

    async def teapot(request: Any) -> Any:
        raise HTTPException(418, "short and stout")

    app = Starlette(
        routes=[Route("/v1/status", endpoint(status), methods=["GET"]),
                Route("/v1/teapot", teapot, methods=["GET"])],
        exception_handlers={HTTPException: api.http_error},
    )
    async with client_for(app) as client:
        wrong = await client.request("PROPFIND", "/v1/status")
        missing = await client.request("PROPFIND", "/v1/nope")
        teapot_response = await client.get("/v1/teapot")
    assert wrong.status_code == 405
    assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert wrong.json() == {
        "error": f"method PROPFIND is not allowed for /v1/status, only GET, HEAD; {README_HINT}"
    }
    assert missing.status_code == 404
    assert missing.json() == {"error": f"the control API has no route PROPFIND /v1/nope; {README_HINT}"}
    assert teapot_response.status_code == 418
    assert teapot_response.json() == {"error": f"GET /v1/teapot failed: short and stout; {README_HINT}"}


async def test_unusual_method_is_json() -> None:
    # No fallback route serves PROPFIND, so the app's exception handler returns the error.
    async with client_for(app_with_deals(Deals(0))) as client:
        response = await client.request("PROPFIND", "/v1/status")
    assert response.status_code in (404, 405)
    assert response.headers["content-type"] == "application/json"
    assert "PROPFIND" in response.json()["error"]
