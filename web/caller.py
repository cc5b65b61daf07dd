"""The one FastAPI dependency every route, API and page alike, uses to learn who is calling and what they may do.

`caller` authenticates the request once — an API key or the CLI token for `/api`, `/v1` and `/metrics` (a
401 without one; a signed-in browser session counts too), the browser session for pages (a redirect to sign
in) — and reads the caller's `Access` from the database once per request. Routes then ask
`me.require(action, collection)` or `me.may(...)`, the same vocabulary as the core, and pass `me.actor` to
the use cases, which write the audit records.
`requires(action)` is `caller` plus one `require`, for routes that need a global right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from appliance.access.actors import Actor
from appliance.access.rbac import Access
from appliance.access.users import Principal
from web import sessions
from web.auth import require_user
from web.rendering import check_csrf, is_page, nav, signed_in
from web.security import client_address


@dataclass(frozen=True)
class Caller:
    actor: Actor
    principal: Principal
    signed: sessions.SignedIn | None  # the browser session behind a page (its user, its CSRF token)

    @property
    def access(self) -> Access:
        return self.actor.access

    def may(self, action: str, collection: str | None = None) -> bool:
        return self.actor.may(action, collection)

    def require(self, action: str, collection: str | None = None, *, message: str | None = None) -> None:
        self.actor.require(action, collection, message=message)

    def check_csrf(self, sent: object) -> None:
        """A page's form carries its session's CSRF token (API calls prove themselves with the key)."""
        assert self.signed is not None, "only a page's form carries a CSRF field"
        check_csrf(self.signed, sent)

    def nav(self) -> dict:
        """The signed-in header of a page (its user, CSRF token, and what to offer)."""
        assert self.signed is not None, "only pages have a header"
        return nav(self.signed, self.access)


def caller(request: Request) -> Caller:
    """Who sent this request (FastAPI runs it in a worker thread: it reads the database)."""
    cached = getattr(request.state, "caller", None)
    if cached is not None:
        return cached
    if is_page(request):
        signed: sessions.SignedIn | None = signed_in(request)
        assert signed is not None
        principal = signed.principal
    else:
        signed, principal = None, require_user(request)
    me = Caller(Actor.of(request.app.state.db, principal, client_address(request)), principal, signed)
    request.state.caller = me
    return me


def requires(action: str, message: str | None = None) -> Callable[[Request], Caller]:
    """`Depends(requires("manage_models"))`: the caller, who must hold a global right (else 403)."""

    def dependency(request: Request) -> Caller:
        me = caller(request)
        me.require(action, message=message)
        return me

    return dependency
