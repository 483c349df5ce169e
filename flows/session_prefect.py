"""The embedded Prefect server of a terminal session, started as early as the CLI can, on a database that is
migrated once per user rather than once per output directory.

Prefect starts its own server (a uvicorn process) only when the flow's first call needs it, after the CLI
has imported Prefect and its server modules (2-3 s), and a new PREFECT_HOME's database then runs every
migration (about 6 s here). Here the CLI starts that same process (Prefect's own command and environment)
before it imports Prefect, points PREFECT_API_URL at it, and imports the flow while it starts; a new
database is copied from a template migrated once per user and Prefect version (``template_dir``), and the
first session that migrates one keeps a consistent copy of it as that template.

Only where Prefect would have started its own server: no API URL configured (environment, profile or
settings files: checked once Prefect is imported; a wrong guess stops this server and changes nothing).
A server that does not come up is stopped and Prefect's own start runs instead, and says why it fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DB = "prefect.db"
MEMO = "memo_store.toml"  # Prefect's note that the database's block types are registered
_API_URL = "PREFECT_API_URL"
_PORT_IN_USE = 3  # uvicorn's exit status when its port is taken


def template_dir(version: str, cache: Path | None = None) -> Path:
    """Where this user's migrated template database for a Prefect version is kept (XDG cache)."""
    base = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stemstream" / f"prefect-{version}"


def _copy_new(src: Path, dst: Path) -> bool:
    """Copy src to dst only if dst does not exist (a hard link of a full copy: never over a file)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(src.read_bytes())
        os.link(tmp, dst)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def seed_database(home: Path, template: Path) -> bool:
    """Copy the template's migrated database (and block memo) into a PREFECT_HOME that has no database;
    False when it has one or there is no template."""
    if (home / DB).exists() or not (template / DB).is_file():
        return False
    if not _copy_new(template / DB, home / DB):
        return False
    if (template / MEMO).is_file() and not (home / MEMO).exists():
        _copy_new(template / MEMO, home / MEMO)
    return True


def keep_template(home: Path, template: Path) -> bool:
    """Once a server is up on a new database (migrated, block types registered, no run yet): a consistent
    copy of it (SQLite's backup) as the template, unless there is one already."""
    if (template / DB).exists() or not (home / DB).is_file():
        return False
    template.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = template / f".{DB}.{os.getpid()}.tmp"
    try:
        src, dst = sqlite3.connect(home / DB), sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        if (home / MEMO).is_file():
            _copy_new(home / MEMO, template / MEMO)
        return _copy_new(tmp, template / DB)
    except (OSError, sqlite3.Error):  # a cache that cannot be written only costs the next session's time
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedServer:
    """Prefect's ephemeral API server process, started by the CLI."""

    popen: subprocess.Popen
    port: int
    home: Path
    template: Path | None  # None: not the CLI's database to seed or keep as the template
    seeded: bool

    @property
    def api_url(self) -> str:
        """Its API's address."""
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout: float) -> bool:
        """Poll its health until it answers (True), it exits or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        while time.monotonic() < deadline and self.popen.poll() is None:
            with contextlib.suppress(OSError), direct.open(f"{self.api_url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Terminate it (as Prefect stops its own: 5 s, then killed)."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_server(home: Path, template: Path | None) -> EmbeddedServer | None:
    """Start Prefect's ephemeral server process now, its database seeded from the template (None: keep
    whatever is there), with Prefect's own command and environment; None if Prefect is not installed."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        return None
    seeded = seed_database(home, template) if template is not None else False
    port = _free_port()
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent)]
    argv += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "error", "--lifespan", "on"]
    env = os.environ | {
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    return EmbeddedServer(subprocess.Popen(argv, env=env), port, home, template, seeded)


def early_server(chose_home: bool) -> EmbeddedServer | None:
    """Before Prefect is imported: start its server now if Prefect would start one itself (no API URL in
    the environment; profiles are checked by ``adopt``). Its database is seeded from the template when the
    CLI chose PREFECT_HOME (the output directory's) and the database lives there."""
    if _API_URL in os.environ or "prefect" in sys.modules:
        return None
    home = Path(os.environ["PREFECT_HOME"])
    elsewhere = any(k.endswith("DATABASE_CONNECTION_URL") for k in os.environ if k.startswith("PREFECT_"))
    version = _prefect_version()
    template = template_dir(version) if chose_home and not elsewhere and version else None
    server = start_server(home, template)
    if server is not None:
        os.environ[_API_URL] = server.api_url  # before Prefect reads its settings: every thread sees it
    return server


def _prefect_version() -> str:
    """Prefect's installed version, without importing it ("" if unknown)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefect")
    except PackageNotFoundError:
        return ""


def adopt(server: EmbeddedServer) -> bool:
    """Once Prefect is imported: keep the server if Prefect's settings, without the CLI's API URL, would
    have it start its own, and it comes up within Prefect's start-up timeout (then a new database becomes
    the template); else stop it and give Prefect back its own settings (False)."""
    import prefect.context
    from prefect.settings import Settings

    ours = os.environ.pop(_API_URL)
    try:
        settings = Settings()
    finally:
        os.environ[_API_URL] = ours
    ephemeral = settings.server.ephemeral
    if settings.api.url is None and ephemeral.enabled and server.wait(ephemeral.startup_timeout_seconds):
        if server.template is not None and not server.seeded:
            keep_template(server.home, server.template)
        return True
    server.stop()
    del os.environ[_API_URL]
    prefect.context.refresh_global_settings_context()
    return False
