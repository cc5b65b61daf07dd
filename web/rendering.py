"""Pages' common ground: the Jinja2 environment (autoescape always on), static assets, who is signed in.

Assets are read from web/static once and served with their content type and a year of caching; their
URLs carry a digest of the content, so a new release is fetched at once. Every page and form decides
through `signed_in` (a live, fully signed-in session) and `Access.may`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader

from appliance.access.rbac import Access, access_for
from appliance.errors import NotFound, Unauthorized
from web import sessions
from web.security import CsrfRefused, audit

HERE = Path(__file__).parent
CONTENT_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    digest: str


def load_assets(directory: Path = HERE / "static") -> dict[str, Asset]:
    assets = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in CONTENT_TYPES:
            body = path.read_bytes()
            assets[path.name] = Asset(body, CONTENT_TYPES[path.suffix], hashlib.sha256(body).hexdigest()[:12])
    return assets


ASSETS = load_assets()


def static_url(name: str) -> str:
    return f"/static/{name}?v={ASSETS[name].digest}"


def serve_asset(name: str) -> Response:
    asset = ASSETS.get(name)
    if asset is None:
        raise NotFound("not found")
    return Response(
        asset.body,
        media_type=asset.content_type,
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, auto_reload=False)
templates.globals["static"] = static_url


class SignInRequired(Unauthorized):
    """No live signed-in session: the page redirects to `location` (sign-in, TOTP, or enrolment)."""

    def __init__(self, message: str, location: str):
        super().__init__(message)
        self.location = location


def safe_next(path: str | None) -> str:
    """Where to go after sign-in: a local path only (never another site)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path or len(path) > 1000:
        return "/"
    if any(ord(c) < 0x21 or c == "\x7f" for c in path):  # browsers drop tabs and newlines: "/\t/evil.example"
        return "/"
    return path


def signed_in(request: Request) -> sessions.SignedIn:
    """The fully signed-in session of this request, or SignInRequired (a redirect)."""
    signed, reason = sessions.current(request)
    if signed is None:
        if reason in ("idle", "expired", "disabled"):
            audit(request, request.state.ended_user, "session_refused", outcome="denied", reason=reason)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        login = "/login" if target == "/" else f"/login?next={quote(target, safe='/')}"
        if reason:
            login += ("&" if "?" in login else "?") + f"ended={reason}"
        raise SignInRequired("sign in first", login)
    if signed.row.stage == "mfa":
        raise SignInRequired("enter your authenticator code", "/login/totp")
    if signed.row.stage == "enrol":
        raise SignInRequired("set up two-factor sign-in first", "/mfa/enrol")
    return signed


def check_csrf(signed: sessions.SignedIn, sent: object) -> None:
    if not isinstance(sent, str) or not sessions.csrf_matches(sent, signed.csrf):
        raise CsrfRefused("This form has expired or did not come from this site. Reload the page and try again.")


def nav(signed: sessions.SignedIn, access: Access) -> dict:
    """What every signed-in page's header shows (`Caller.nav()` for a route's own caller)."""
    return {
        "me": signed.user,
        "csrf": signed.csrf,
        "can_upload": access.may_upload_somewhere(),
        "can_admin": access.may_administer(),
        "break_glass": access.break_glass,  # shown on every page while one is live
    }


def render(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
    html = templates.get_template(template).render(request_path=request.url.path, **context)
    return HTMLResponse(html, status_code=status)


def is_page(request: Request) -> bool:
    """Requests answered with HTML pages (errors included) rather than JSON."""
    path = request.url.path
    if path.startswith(("/api/", "/v1/", "/static/")) or path in ("/api", "/v1", "/metrics", "/health", "/ready"):
        return False
    if path == "/":
        return "text/html" in request.headers.get("accept", "")
    return True


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    signed, _ = sessions.current(request)
    context = {}
    if signed is not None and signed.row.stage == "full":
        context = nav(signed, access_for(request.app.state.db, signed.principal))
    titles = {400: "Cannot do that", 401: "Sign in", 403: "Not allowed", 404: "Not found", 409: "Already exists"}
    return render(
        request,
        "error.html",
        status=status,
        title=titles.get(status, "Something went wrong"),
        message=message,
        **context,
    )
