"""The live page at the microscope: a Starlette app (served by uvicorn) over the live view's state.

    GET /                          the page (streaming/view/page.html)
    GET /api/state                 every scan of the session: status, frames, rate, completeness, file
    GET /api/scans/{key}/{image}.png    bf, adf, com_x, com_y, pattern, frames (PNG; ?v= the version)
    GET /api/scans/{key}/{image}.json   the same image's values (version, shape, values)
    WS  /ws                        the state again whenever it changes

With a token every request needs it: ``?token=`` (the page then keeps it in a cookie) or that cookie.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from http.cookies import SimpleCookie
from importlib.resources import files
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from streaming.view.png import image_png
from streaming.view.state import IMAGES, ViewState

COOKIE = "stemstream_live"


class TokenGate:
    """ASGI middleware: without the token (query or cookie) a request gets 401, a WebSocket is closed."""

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401})
            return
        await Response("a token is required (?token=...)\n", 401, media_type="text/plain")(
            scope, receive, send
        )

    def _allowed(self, scope) -> bool:
        query = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
        cookie = SimpleCookie()
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                cookie.load(value.decode("latin-1"))
        given = [query, cookie[COOKIE].value if COOKIE in cookie else ""]
        return any(g and hmac.compare_digest(g, self.token) for g in given)


def live_app(state: ViewState, token: str | None = None, title: str = "stemstream live") -> Starlette:
    """The page's ASGI app over ``state``."""
    page = files("streaming.view").joinpath("page.html").read_text().replace("{{title}}", title)

    async def index(request: Request) -> Response:
        response = HTMLResponse(page, headers={"Cache-Control": "no-store"})
        if token and request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def api_state(request: Request) -> Response:
        return JSONResponse(_state(state))

    async def image(request: Request) -> Response:
        key, name, fmt = request.path_params["key"], request.path_params["name"], request.path_params["fmt"]
        if name not in IMAGES or fmt not in ("png", "json"):
            return Response("no such image\n", 404, media_type="text/plain")
        try:
            version, img = await asyncio.to_thread(state.image, key, name, fmt == "png")
        except KeyError:
            return Response("no such scan\n", 404, media_type="text/plain")
        if fmt == "json":
            return JSONResponse(
                {"version": version, "shape": list(img.shape), "values": img.ravel().tolist()}
            )
        body = await asyncio.to_thread(image_png, img, name)
        return Response(body, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def updates(ws: WebSocket) -> None:
        await ws.accept()
        seen = -1
        try:
            for _ in range(10**9):  # until the page goes away
                if state.version != seen:
                    seen = state.version
                    await ws.send_text(json.dumps(_state(state)))
                await asyncio.sleep(0.05)
        except (WebSocketDisconnect, RuntimeError):
            return

    routes = [
        Route("/", index),
        Route("/api/state", api_state),
        Route("/api/scans/{key}/{name}.{fmt}", image),
        WebSocketRoute("/ws", updates),
    ]
    app = Starlette(routes=routes)
    return TokenGate(app, token) if token else app


def _state(state: ViewState) -> dict:
    return {"version": state.version, "scans": state.scans(), "malformed": state.malformed}
