"""The live view server: snapshot intake (streaming.view.ingest) and the page (streaming.view.app) under
uvicorn, in one process, started and stopped as one."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import uvicorn

from counting.errors import PermanentError
from streaming.settings import LiveSettings
from streaming.transport.security import CurveServerConfig
from streaming.view.aberration import AberrationOut
from streaming.view.app import Clients, live_app
from streaming.view.guard import page_hosts
from streaming.view.ingest import LiveIngest
from streaming.view.phase import Calibration, PhaseWorker
from streaming.view.state import ViewState
from streaming.view.token import page_token

log = logging.getLogger(__name__)


class LiveViewFailed(PermanentError, RuntimeError):
    """A part of the live view (its snapshot intake, its page) stopped on its own."""


class LiveServer:
    """Takes snapshots on ``live.bind`` and serves the page on ``live.page_host:page_port``.

    Exposed beyond loopback (or with live.token_required), the page asks for a token: live.token, else the one
    in live.token_file, else a random one made here (written to live.token_file when given). On loopback it
    answers only to loopback Host names, and at most live.max_clients pages follow the state at once."""

    def __init__(
        self, live: LiveSettings, curve: CurveServerConfig | None = None, scan_dir: Path | None = None
    ) -> None:
        self.state = ViewState()
        self.token: str | None = None
        self.token_configured = (
            False  # live.token itself (its user knows it), not one from a file or made here
        )
        if live.needs_token:
            self.token, self.token_configured = page_token(live)
        try:
            self._sock = socket.create_server((live.page_host, live.page_port))
        except OSError as exc:  # e.g. another session's page: any free port, the URL says which
            log.warning("the live page cannot use port %d (%s); taking a free port", live.page_port, exc)
            self._sock = socket.create_server((live.page_host, 0))
        self.port = self._sock.getsockname()[1]
        self.host = live.page_host
        self.token_file = live.token_file
        self.ingest = LiveIngest(self.state, live.bind, curve, scan_dir)
        scale = None
        if live.phase_scan_step_nm is not None and live.phase_mrad_per_px is not None:
            scale = Calibration(live.phase_scan_step_nm, live.phase_mrad_per_px)
        self.aberration = AberrationOut(live, curve) if live.aberration else None  # tap.aberration
        on_fit = self.aberration.publish if self.aberration is not None else None
        self.phase = PhaseWorker(self.state, live.phase_interval, scale, on_fit)  # off the intake's thread
        self.clients = Clients(live.max_clients)
        config = uvicorn.Config(
            live_app(
                self.state, self.token, hosts=page_hosts(live.page_host, live.exposed), clients=self.clients
            ),
            log_level="warning",
            access_log=False,
            ws="websockets-sansio",  # with write flow control from uvicorn 0.52.1: a send waits for the client
            lifespan="off",
            ws_max_size=64 * 1024,  # the page sends nothing; nobody else needs more
            limit_concurrency=live.max_clients + 64,  # connections and tasks: more get 503
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """The page's address without its token: what logs and links may show."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    @property
    def url(self) -> str:
        """The page's address with the token when there is one (for the user's own eyes only)."""
        return self.address + (f"?token={quote(self.token)}" if self.token else "")

    def start(self, timeout: float = 10.0) -> LiveServer:
        """Serve in a background thread; returns once the page answers."""
        self.ingest.start()
        self.phase.start()
        self._thread = threading.Thread(target=self.serve, name="stemstream-live-page", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the live page did not start")
            time.sleep(0.02)
        return self

    def serve(self) -> None:
        """Serve the page in this thread until ``stop``."""
        self._server.run(sockets=[self._sock])

    def run_until(self, done: threading.Event, timeout: float | None = None) -> None:
        """Serve until done is set (or timeout), checking twice a second that the intake and the page still
        run; raise LiveViewFailed naming a part that stopped (its process then exits non-zero)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.5):
            if not self.ingest.alive:
                raise LiveViewFailed("live view: the snapshot intake stopped (see the log above)")
            if self._thread is not None and not self._thread.is_alive():
                raise LiveViewFailed("live view: the page server stopped (see the log above)")
            if end is not None and time.monotonic() >= end:
                return

    def stop(self) -> None:
        """Stop the page and the intake."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()
        self.ingest.close()
        self.phase.close()
        if self.aberration is not None:
            self.aberration.close()
