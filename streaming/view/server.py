"""The live view server: snapshot intake (streaming.view.ingest) and the page (streaming.view.app) under
uvicorn, in one process, started and stopped as one."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from pathlib import Path

import uvicorn

from streaming.settings import LiveSettings
from streaming.transport.security import CurveServerConfig
from streaming.view.app import live_app
from streaming.view.ingest import LiveIngest
from streaming.view.state import ViewState

log = logging.getLogger(__name__)


class LiveServer:
    """Takes snapshots on ``live.bind`` and serves the page on ``live.page_host:page_port``.

    Exposed beyond loopback, the page asks for a token (live.token, or a random one made here)."""

    def __init__(
        self, live: LiveSettings, curve: CurveServerConfig | None = None, scan_dir: Path | None = None
    ) -> None:
        self.state = ViewState()
        self.token: str | None = None
        if live.needs_token:
            self.token = live.token.get_secret_value() if live.token else secrets.token_urlsafe(18)
        try:
            self._sock = socket.create_server((live.page_host, live.page_port))
        except OSError as exc:  # e.g. another session's page: any free port, the URL says which
            log.warning("the live page cannot use port %d (%s); taking a free port", live.page_port, exc)
            self._sock = socket.create_server((live.page_host, 0))
        self.port = self._sock.getsockname()[1]
        self.host = live.page_host
        self.ingest = LiveIngest(self.state, live.bind, curve, scan_dir)
        config = uvicorn.Config(
            live_app(self.state, self.token),
            log_level="warning",
            access_log=False,
            ws="websockets-sansio",
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address (with the token when there is one)."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self, timeout: float = 10.0) -> LiveServer:
        """Serve in a background thread; returns once the page answers."""
        self.ingest.start()
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

    def stop(self) -> None:
        """Stop the page and the intake."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()
        self.ingest.close()
