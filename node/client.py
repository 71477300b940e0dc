"""Client of the control API, used by the CLI and by devnet tooling."""

from __future__ import annotations

from typing import Any

import httpx

from node.datadir import DataDir


class ControlError(Exception):
    """The daemon could not be reached or reported an error."""

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NoDaemon(ControlError):
    """No daemon runs for this data directory."""


class DaemonGone(ControlError):
    """The daemon went away while it handled a request."""


class ControlClient:
    def __init__(self, data_dir: DataDir, *, timeout: float = 30.0) -> None:
        self.data_dir = data_dir
        self.timeout = timeout

    def _client(self, timeout: float | None) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.data_dir.control_socket))
        return httpx.Client(transport=transport, base_url="http://pmarket", timeout=timeout or self.timeout)

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        if not self.data_dir.control_socket.exists():
            raise NoDaemon(self._no_daemon_message())
        try:
            with self._client(timeout) as client:
                response = client.request(method, path, json=json, params=params)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(self._no_daemon_message()) from None
        except httpx.TimeoutException:
            raise ControlError(f"the daemon for {self.data_dir.root} did not respond to {method} {path} in time") from None
        except httpx.TransportError as exc:
            # The daemon accepted the request, then the connection broke: it
            # stopped or crashed while handling it.
            raise DaemonGone(
                f"the daemon for {self.data_dir.root} closed the connection during {method} {path} "
                f"({type(exc).__name__}); it stopped or crashed: see {self.data_dir.log}, "
                f"then start it again with `pmarket node start --data-dir {self.data_dir.root}`"
            ) from None
        try:
            body = response.json()
        except ValueError:
            raise ControlError(f"the daemon sent a response that is not JSON (HTTP {response.status_code})") from None
        if response.status_code >= 400:
            message = body.get("error", f"HTTP {response.status_code}") if isinstance(body, dict) else str(body)
            reason = body.get("reason") if isinstance(body, dict) else None
            raise ControlError(message, status=response.status_code, reason=reason)
        return body

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {}, timeout=timeout)

    def _no_daemon_message(self) -> str:
        return (
            f"no pmarket daemon is running for {self.data_dir.root}; "
            f"start one with `pmarket node start --data-dir {self.data_dir.root}`"
        )
