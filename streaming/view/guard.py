"""Who may read the live page: the Host a request names (on loopback: DNS rebinding), the Origin of a
WebSocket (a cross-site page), and the token (``?token=`` or the page's cookie), in one ASGI middleware."""

from __future__ import annotations

import hmac
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs

from starlette.responses import Response

COOKIE = "stemstream_live"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


def page_hosts(page_host: str, exposed: bool) -> frozenset[str] | None:
    """The Host names a page answers: on loopback its loopback names and its configured host; None (any,
    behind the token) when it is exposed."""
    if exposed:
        return None
    host = page_host.lower().strip("[]")
    return LOOPBACK_NAMES | {host, f"[{host}]"}


def host_name(host: str) -> str:
    """The name of a Host header without its port, lower case (``[::1]:80`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def same_token(given: str, token: str) -> bool:
    """Constant-time comparison of bytes (any str, non-ASCII included, compares: never an error)."""
    return bool(given) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())


class PageGuard:
    """ASGI middleware: a Host not served gets 400, a WebSocket from another origin 403, a request without
    the token 401 (for a WebSocket: refused at the handshake)."""

    def __init__(self, app, token: str | None, hosts: frozenset[str] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    @property
    def state(self):
        """The app's state (its WebSocket clients)."""
        return self.app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        host = (headers.get("host") or [""])[0]
        refusal = None
        if self.hosts is not None and host_name(host) not in self.hosts:
            refusal = Response("this page does not answer to that Host\n", 400, media_type="text/plain")
        elif scope["type"] == "websocket" and not _same_origin(headers.get("origin"), host):
            refusal = Response("WebSocket from another origin\n", 403, media_type="text/plain")
        elif self.token and not self._has_token(scope, headers.get("cookie", [])):
            refusal = Response("a token is required (?token=...)\n", 401, media_type="text/plain")
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
            await refusal(scope, receive, send)
        else:  # a server without denial responses: a close before accept is a 403
            await send({"type": "websocket.close", "code": 4000 + refusal.status_code})

    def _has_token(self, scope, cookies: list[str]) -> bool:
        query = scope.get("query_string", b"").decode("latin-1")
        given = parse_qs(query, encoding="utf-8", errors="surrogateescape").get("token", [])
        jar = SimpleCookie()
        for value in cookies:
            try:
                jar.load(value)
            except CookieError:
                continue
        if COOKIE in jar:
            given.append(jar[COOKIE].value)
        return any(same_token(g, self.token) for g in given)


def _same_origin(origin: list[str] | None, host: str) -> bool:
    """A WebSocket without Origin is no browser's (no page to be cross-site); with one, it must be this page's."""
    if not origin:
        return True
    scheme, _, netloc = origin[0].strip().lower().partition("://")
    return scheme in ("http", "https") and netloc == host.strip().lower()
