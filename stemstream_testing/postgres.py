"""A real PostgreSQL server for the catalogue tests: Debian's ``postgresql`` binaries, a fresh data
directory in a temporary folder, listening on loopback only (and a socket in that folder), trust
authentication for local test users only. Run as the ``postgres`` user when the tests run as root (initdb
and postgres refuse root). Always stopped and removed by ``close``.

    with PostgresServer.start() as pg:
        url = pg.create_database("cat1")   # postgresql+psycopg://postgres@127.0.0.1:PORT/cat1
        pg.stop(); pg.restart()             # a database that goes away and comes back
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    """Debian's postgresql is not installed (scripts/install-test-deps.sh installs it)."""


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(
        glob.glob(BIN_GLOB), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0
    )
    if not found or not (Path(found[-1]) / "initdb").exists():
        raise PostgresUnavailable(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install Debian's "
            "postgresql (scripts/install-test-deps.sh)"
        )
    return Path(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One throwaway PostgreSQL cluster on loopback."""

    def __init__(self, root: Path, port: int, user: str | None) -> None:
        self.root, self.port, self.user = root, port, user
        self.bin = postgres_bin()
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.running = False

    @classmethod
    def start(cls, timeout: float = 60.0) -> PostgresServer:
        """initdb a fresh cluster in a temporary directory and start it."""
        root = Path(tempfile.mkdtemp(prefix="stemstream-pg-"))
        user = "postgres" if os.geteuid() == 0 else None
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        server = cls(root, _free_port(), user)
        try:
            server._run(
                "initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8",
                timeout=timeout,
            )  # fmt: skip
            server.restart(timeout)
        except BaseException:
            server.close()
            raise
        return server

    def _run(self, tool: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def restart(self, timeout: float = 60.0) -> None:
        """Start the server (again), on the same port and data: it answers when this returns."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", str(int(timeout)),
                  "start", timeout=timeout + 10)  # fmt: skip
        self.running = True

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the server (fast: connections are cut), keeping its data."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(timeout)), "stop",
                      timeout=timeout + 10)  # fmt: skip
            self.running = False

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of a database on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database; its URL."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - still kill what is left, below
            pid_file = self.data / "postmaster.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), 9)
                    time.sleep(0.5)
                except (OSError, ValueError, IndexError):
                    pass
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
