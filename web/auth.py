"""API authentication: bearer keys on every /api and /v1 route, the local CLI token, the browser's
session cookie (state-changing methods only with the session's X-CSRF-Token header), Host checks.
Each authenticated API request is then counted against its user's rate limits (`web.rate_limits`)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from pathlib import Path

import psutil
from fastapi import Request

from appliance.access.users import Principal, authenticate_key
from appliance.errors import Unauthorized
from web import rate_limits, sessions
from web.security import CsrfRefused

CLI_TOKEN_FILE = "cli.token"  # noqa: S105 (a file name, not a secret)
LOCAL_ADMIN = Principal(user_id=0, name="local-cli", role="admin")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def issue_cli_token(run_dir: Path) -> str:
    """A fresh token for the local CLI, readable only by the appliance's own OS user (mode 0600).

    Whoever can read APPLIANCE_HOME can read the database and the models anyway, so this grants
    nothing new; it lets `appliance run` and `appliance ps` talk to the server without a key.
    Returns the token's SHA-256, which is all the server keeps.
    """
    token = "cli_" + secrets.token_urlsafe(32)
    path = run_dir / CLI_TOKEN_FILE
    path.unlink(missing_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(token)
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def require_user(request: Request) -> Principal:
    """The caller behind the request's key, or behind a signed-in browser session; raises Unauthorized,
    or TooManyRequests when that caller is over its rate limit."""
    principal = _authenticate(request)
    request.state.principal = principal  # names the caller in the audit record if the request is refused
    rate_limits.enforce(request, principal)
    return principal


def _authenticate(request: Request) -> Principal:
    token = bearer_token(request)
    if not token:
        signed, _reason = sessions.current(request)
        if signed is not None and signed.row.stage == "full":
            if request.method not in SAFE_METHODS and not sessions.csrf_matches(
                request.headers.get("x-csrf-token"), signed.csrf
            ):
                raise CsrfRefused("missing or stale X-CSRF-Token header: reload the page and try again")
            return signed.principal
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>' (create one with `appliance keys create --user NAME`)"
        )
    state = request.app.state
    if token.startswith("cli_"):
        if hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), state.cli_token_hash):
            return LOCAL_ADMIN
        raise Unauthorized("invalid API key")
    return authenticate_key(state.db, token)


LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


def host_name(host_header: str) -> str:
    """The name (or address, IPv6 without brackets) a Host header gives, without its port, lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.split(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _own_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether one of this machine's network interfaces has this address."""
    return any(
        item.address.split("%")[0] == str(address)
        for items in psutil.net_if_addrs().values()
        for item in items
        if item.family in (socket.AF_INET, socket.AF_INET6)
    )


def _names_this_machine(host: str) -> bool:
    """Ollama's rule for a loopback server: localhost, this machine's hostname, *.localhost, *.local, *.internal,
    or a loopback, private, unspecified or own address. None of these is a name an outside site's DNS answers
    for, and a DNS rebinding attack needs one (an address typed in the URL involves no DNS at all)."""
    if host in ("", "localhost") or host == socket.gethostname().lower() or host.endswith(LOCAL_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified or _own_address(address)


def host_allowed(host_header: str, bind_host: str, extra: list[str]) -> bool:
    """Against DNS rebinding: bound to loopback, Host must name this machine (`_names_this_machine`) or be in
    APPLIANCE_ALLOWED_HOSTS; bound elsewhere, APPLIANCE_ALLOWED_HOSTS, when set, is the list of names."""
    host = host_name(host_header)
    allowed = {host_name(h) for h in extra}
    if host in allowed:
        return True
    if not _is_loopback(bind_host.strip("[]")) and bind_host != "localhost":
        return not allowed  # on a LAN address the reverse proxy / allowed_hosts decide
    return _names_this_machine(host)
