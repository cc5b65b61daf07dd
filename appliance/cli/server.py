"""`appliance serve`, and the HTTP client through which other commands reach the running server.

The client finds the server at APPLIANCE_URL, else at the address it wrote in APPLIANCE_HOME/run/server.url,
else at APPLIANCE_HOST and APPLIANCE_PORT; it authenticates with APPLIANCE_API_KEY or the local CLI token
the server leaves in APPLIANCE_HOME/run (readable only by its own OS user).
"""

from __future__ import annotations

import json
import os
from typing import Any

from appliance.config import Settings
from appliance.errors import ApplianceError, BadRequest
from appliance.operations import logs
from appliance.services import Services


def server_url(settings: Settings) -> tuple[str, str]:
    """(URL of the running server, where it came from): APPLIANCE_URL, else what the server of this home wrote
    in its run directory, else APPLIANCE_HOST and APPLIANCE_PORT."""
    if settings.server.url:
        return settings.server.url, "APPLIANCE_URL"
    path = settings.server_url_file
    written = path.read_text().strip() if path.is_file() else ""
    if written:
        return written, f"written by the server in {path}"
    return settings.server.local_url, "APPLIANCE_HOST and APPLIANCE_PORT"


class ServerClient:
    """A small HTTP client for the running server (used by run, ps, stop)."""

    def __init__(self, settings: Settings):
        import httpx

        self.base, self.source = server_url(settings)
        key = os.environ.get("APPLIANCE_API_KEY")
        token_file = settings.run_dir / "cli.token"
        if not key and token_file.is_file():
            key = token_file.read_text().strip()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            self.http = httpx.Client(base_url=self.base, headers=headers, timeout=httpx.Timeout(600, connect=5))
        except httpx.InvalidURL as exc:
            raise BadRequest(f"{self.base!r} ({self.source}) is not a usable URL: {exc}") from None

    def _unreachable(self) -> str:
        return (
            f"could not reach the server at {self.base} ({self.source}); start it with `appliance serve`, "
            "or say where it runs with APPLIANCE_URL"
        )

    def _check(self, response) -> None:
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text
            error = ApplianceError(str(message))
            error.status = response.status_code
            raise error

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, json=body)
        except httpx.ConnectError:
            raise ApplianceError(self._unreachable()) from None
        self._check(response)
        return response.json() if response.content else None

    def stream(self, path: str, body: dict):
        import httpx

        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if line.strip():
                        item = json.loads(line)
                        if "error" in item:
                            raise ApplianceError(item["error"])
                        yield item
        except httpx.ConnectError:
            raise ApplianceError(self._unreachable()) from None


def cmd_serve(services: Services, args) -> int:
    import uvicorn

    from web.app import create_app

    settings = services.settings
    try:
        settings.server.set_address(args.host, args.port)
    except ValueError as exc:
        raise BadRequest(f"--host {exc}") from None
    logs.configure(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.log_level.lower(),
        # With JSON, uvicorn's own loggers must reach the root handler instead of its text handlers.
        **({"log_config": None} if settings.log_format == "json" else {}),
        access_log=False,
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the server")
    p.add_argument("--host", help="address to bind, as APPLIANCE_HOST: host, host:port, [::1]:port, http://host:port")
    p.add_argument("--port", type=int, help="TCP port (wins over a port in --host)")
    p.set_defaults(func=cmd_serve)
