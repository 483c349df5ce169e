"""The live page at the microscope: a Starlette app (served by uvicorn) over the live view's state.

    GET /                          the page (streaming/view/page.html)
    GET /api/state                 every scan of the session: status, frames, rate, completeness, file,
                                   phase (the live phase fit: streaming.view.phase.record)
    GET /api/scans/{key}/{image}.png    bf, adf, com_x, com_y, pattern, frames, and tcbf (tilt-corrected
                                   BF), idpc (iDPC phase) once the phase work made them (PNG; ?v= the version)
    GET /api/scans/{key}/{image}.json   the same image's values (version, shape, values; up to MAX_JSON_VALUES)
    WS  /ws                        the state again whenever it changes (at most ``max_clients`` at once)

Guards (streaming.view.guard): on loopback only the loopback names and the page's own host are served (DNS
rebinding) and a WebSocket from another origin is refused; with a token every request needs it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from streaming.view.guard import COOKIE, PageGuard
from streaming.view.png import image_png
from streaming.view.state import IMAGES, ViewState

MAX_JSON_VALUES = 2048 * 2048  # beyond: 413 (the values of a 4096² image are hundreds of MB of JSON)
POLL = 0.05  # seconds between a client's looks at the state's version


@dataclass
class Client:
    """One page's WebSocket: it is sent the newest state only once its previous send has completed (the
    server's write buffer then drained), so a client that does not read skips updates and costs no memory."""

    sent: int = 0
    skipped: int = 0  # state versions that passed while a send to it was still in progress
    seen: int = -1  # the version last handed to it
    sending: bool = False  # a send in progress: its one message in flight (there is never a queue)


@dataclass
class Clients:
    """The open WebSockets, at most ``limit``; more are refused at the handshake."""

    limit: int = 16
    open: list[Client] = field(default_factory=list)
    refused: int = 0

    def join(self) -> Client | None:
        """A new client, or None when ``limit`` are open."""
        if len(self.open) >= self.limit:
            self.refused += 1
            return None
        client = Client()
        self.open.append(client)
        return client


def live_app(
    state: ViewState,
    token: str | None = None,
    title: str = "stemstream live",
    hosts: frozenset[str] | None = None,
    clients: Clients | None = None,
) -> PageGuard:
    """The page's ASGI app over ``state``; ``hosts``: the Host names served (None: any, an exposed page)."""
    page = files("streaming.view").joinpath("page.html").read_text().replace("{{title}}", title)
    clients = clients if clients is not None else Clients()
    building = asyncio.Semaphore(2)  # image encodings at once: many requests queue, not pile up in memory

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
        scan = state.scan(key)
        if (
            fmt == "json"
            and scan is not None
            and name != "pattern"
            and scan.width * scan.height > MAX_JSON_VALUES
        ):
            return Response("too many values for JSON: use the .png\n", 413, media_type="text/plain")
        async with building:
            try:
                version, img = await asyncio.to_thread(state.image, key, name, fmt == "png")
            except KeyError:
                return Response("no such scan\n", 404, media_type="text/plain")
            if fmt == "json":
                body = await asyncio.to_thread(_values_json, version, img)
                return Response(body, media_type="application/json")
            body = await asyncio.to_thread(image_png, img, name)
        return Response(body, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    rendered: list = [-1, ""]  # the state's JSON at one version: made once however many clients follow it

    def render(version: int) -> str:
        if rendered[0] != version:
            rendered[:] = [version, json.dumps(_state(state))]
        return rendered[1]

    async def updates(ws: WebSocket) -> None:
        client = clients.join()
        if client is None:
            await ws.close(code=1013)  # before accept: the handshake is refused (403)
            return
        try:
            await ws.accept()
            await _follow(ws, state, client, render)
        finally:
            clients.open.remove(client)

    routes = [
        Route("/", index),
        Route("/api/state", api_state),
        Route("/api/scans/{key}/{name}.{fmt}", image),
        WebSocketRoute("/ws", updates),
    ]
    app = Starlette(routes=routes)
    app.state.clients = clients
    return PageGuard(app, token, hosts)


async def _follow(ws: WebSocket, state: ViewState, client: Client, render: Callable[[int], str]) -> None:
    """Send the state whenever its version changed, each send awaited (uvicorn's flow control holds it while
    the client's socket is full), so versions that pass meanwhile are skipped, never queued. Ends when the
    client goes (its slot is free at once, not at the next failed send)."""
    gone = asyncio.create_task(_until_gone(ws))
    try:
        while not gone.done():
            version = state.version
            if version != client.seen:
                client.skipped += version - client.seen - 1 if client.seen >= 0 else 0
                client.seen, client.sending = version, True
                await ws.send_text(render(version))
                client.sent, client.sending = client.sent + 1, False
            await asyncio.wait([gone], timeout=POLL)
    except (WebSocketDisconnect, RuntimeError, OSError):
        return
    finally:
        gone.cancel()


async def _until_gone(ws: WebSocket) -> None:
    """Read (and ignore) what the client sends until it disconnects."""
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass


def _values_json(version: int, img) -> bytes:
    values = {"version": version, "shape": list(img.shape), "values": img.ravel().tolist()}
    return json.dumps(values, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _state(state: ViewState) -> dict:
    # intake: its thread alive (a dead intake must not pass for a quiet one) and the malformed snapshots
    return {
        "version": state.version,
        "scans": state.scans(),
        "malformed": state.malformed,
        "intake": state.intake(),
    }
