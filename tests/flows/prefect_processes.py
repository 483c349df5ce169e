"""Real Prefect processes for the end-to-end tests (test_deployment, test_prefect_ui): `prefect server start`
on a loopback port with its own PREFECT_HOME, the repo's prefect.yaml deployed with `prefect deploy`, a
process worker. Every process is marked in its environment (and so are its children), so a test can find
and end whatever it started, even after a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stemstream_testing.support import free_port

__all__ = ["free_port"]  # re-exported for test_deployment

REPO = Path(__file__).resolve().parents[2]
MARKER = "STEMSTREAM_E2E_MARKER"  # in the environment of every process a test starts, and their children
SESSION_DEPLOYMENT = "stemstream-session/session"


def prefect_cmd() -> list[str]:
    """The `prefect` CLI of this interpreter's environment."""
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll until predicate() is true; fail with the log's tail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries this test's marker (all it started, and their children)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return pids


def stop(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after grace seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def kill_marked(marker: str, grace: float = 15.0) -> list[int]:
    """Wait up to grace seconds for the marked processes to end, SIGKILL the rest; returns those killed."""
    deadline = time.monotonic() + grace
    while (leftovers := marked_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in leftovers:  # ours by the marker: end them so one failure does not leak into the next test
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def run_cli(args: list[str], env: dict[str, str], log: Path, timeout: float = 120) -> None:
    with log.open("ab") as out:
        r = subprocess.run(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args[1:])} failed:\n{log.read_text(errors='replace')[-3000:]}"


def base_env(marker: str, home: Path, api: str) -> dict[str, str]:
    """This environment without PREFECT_/STEMSTREAM_ variables, plus the marker, PREFECT_HOME and the API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "STEMSTREAM_"))}
    env.update(
        {
            MARKER: marker,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
    )
    return env


def start_server(
    port: int, env: dict[str, str], cwd: Path, log: Path, ui: bool = False, timeout: float = 90
) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:port, returned once /api/health answers. No scheduler: the
    nightly experiment must not start a run if a test runs at 02:00 LA time."""
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    # The UI asks /ui-settings where the API is; left alone that says port 4200 whatever --port is.
    server_env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    args = [*prefect_cmd(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--analytics-off", "--no-scheduler"] + ([] if ui else ["--no-ui"])
    with log.open("wb") as out:
        server = subprocess.Popen(
            args, cwd=cwd, env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def healthy() -> bool:
        assert server.poll() is None, f"server exited: {log.read_text(errors='replace')[-3000:]}"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, timeout, "the Prefect server's /api/health", log)
    except BaseException:
        stop(server)
        raise
    return server


def deploy(env: dict[str, str], log: Path) -> None:
    """The work pool, then every deployment of the repo's prefect.yaml, as the README says."""
    prefect = prefect_cmd()
    run_cli([*prefect, "work-pool", "create", "stemstream-local", "--type", "process"], env, log)
    run_cli(
        [*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml")], env, log
    )


def start_worker(env: dict[str, str], cwd: Path, log: Path, name: str = "e2e-worker") -> subprocess.Popen:
    """A process worker on the stemstream-local pool (env must carry STEMSTREAM_REPO for the pull step)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*prefect_cmd(), "worker", "start", "--pool", "stemstream-local", "--name", name],
            cwd=cwd,  # anywhere: the pull step moves each run into the repository
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class PrefectStack:
    """A running server (with the deployments) and worker; url is the server's root, api its API."""

    url: str
    api: str
    output_dir: Path
    server_log: Path
    worker_log: Path

    def log_tails(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in (self.server_log, self.worker_log)
            if p.exists()
        )


@contextmanager
def prefect_stack(tmp_path: Path, ui: bool = True) -> Iterator[PrefectStack]:
    """Server (UI on by default), pool, `prefect deploy --all` and a worker with STEMSTREAM_REPO, all on
    loopback under tmp_path; every process stopped on the way out (and any marked leftover killed)."""
    marker = uuid.uuid4().hex
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    out = tmp_path / "out"
    config = tmp_path / "stemstream.toml"
    config.write_text("# empty: never a developer's ./stemstream.toml\n")
    env = base_env(marker, tmp_path / "prefect_home", api)
    worker_env = {
        **env,
        "STEMSTREAM_REPO": str(REPO),  # resolved by prefect.yaml's pull step in each flow-run process
        "STEMSTREAM_OUTPUT_DIR": str(out),
        "STEMSTREAM_CONFIG": str(config),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    }
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = worker = None
    try:
        server = start_server(port, env, tmp_path, server_log, ui=ui)
        deploy(env, tmp_path / "cli.log")
        worker = start_worker(worker_env, tmp_path, worker_log)
        yield PrefectStack(f"http://127.0.0.1:{port}", api, out, server_log, worker_log)
    finally:
        stop(worker)  # first, so no run is left orphaned by a server that went away
        stop(server)
        leftovers = kill_marked(marker)
    assert not leftovers, f"processes left running after the test: {leftovers}"
