"""End to end as operators run it: `prefect server start`, the repo's prefect.yaml deployed with
`prefect deploy`, a process worker, failure alerts to a webhook. Loopback only, every process stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
MARKER = "STEMSTREAM_E2E_MARKER"  # in the environment of every process this test starts, and their children
SMALL = {"n_scans": 1, "scan_width": 8, "scan_height": 8, "postprocess": False}


def _prefect() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate: Callable[[], object], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll until predicate() is true; fail with the log's tail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def _marked_pids(marker: str) -> list[int]:
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


def _stop(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
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


def _run_cli(args: list[str], env: dict[str, str], log: Path, timeout: float = 120) -> None:
    with log.open("ab") as out:
        r = subprocess.run(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args[1:])} failed:\n{log.read_text(errors='replace')[-3000:]}"


@contextmanager
def _webhook_receiver() -> Iterator[tuple[str, list[dict]]]:
    """A loopback HTTP server that records every JSON body POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append({"path": self.path, "json": json.loads(body or b"null")})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts?token=not-a-secret", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deploy_worker_runs_session_and_alerts_on_failure(tmp_path: Path) -> None:
    """Deploy prefect.yaml, run the session through a worker, and get a webhook alert when a run fails."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.alerts import AUTOMATION_NAME, setup_alerts

    t_start = time.monotonic()
    marker = uuid.uuid4().hex
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    out = tmp_path / "out"
    config = tmp_path / "stemstream.toml"
    config.write_text("# empty: never a developer's ./stemstream.toml\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "STEMSTREAM_"))}
    env.update(
        {
            MARKER: marker,
            "PREFECT_HOME": str(tmp_path / "prefect_home"),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
    )
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    worker_env = {
        **env,
        "STEMSTREAM_REPO": str(REPO),  # resolved by prefect.yaml's pull step in each flow-run process
        "STEMSTREAM_OUTPUT_DIR": str(out),
        "STEMSTREAM_CONFIG": str(config),
        # The nersc run must fail for want of SFAPI credentials, at once, and never leave loopback. A Slurm
        # account is set so that it gets that far: without one, allocate-nodes retries the SlurmConfigError
        # twice (25 s) before failing (see _retry_transient in tasks/steps.py).
        "STEMSTREAM_SLURM__ACCOUNT": "m0000",
        "STEMSTREAM_SFAPI__API_BASE_URL": "http://127.0.0.1:9/api",
        "STEMSTREAM_SFAPI__TOKEN_URL": "http://127.0.0.1:9/token",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    }
    server_log, worker_log, cli_log = tmp_path / "server.log", tmp_path / "worker.log", tmp_path / "cli.log"
    server = worker = None
    leftovers: list[int] = []
    try:
        # No scheduler: the nightly experiment must not start a run here if the test runs at 02:00 LA time.
        with server_log.open("wb") as log:
            server = subprocess.Popen(
                [*_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
                + ["--no-ui", "--analytics-off", "--no-scheduler"],
                cwd=tmp_path,
                env=server_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            assert server.poll() is None, f"server exited: {server_log.read_text(errors='replace')[-3000:]}"
            try:
                return httpx.get(f"{api}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 90, "the Prefect server's /api/health", server_log)
        t_server = time.monotonic()

        prefect = _prefect()
        _run_cli([*prefect, "work-pool", "create", "stemstream-local", "--type", "process"], env, cli_log)
        _run_cli(
            [*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml")],
            env,
            cli_log,
        )
        with temporary_settings(updates={PREFECT_API_URL: api}), _webhook_receiver() as (url, received):
            automation = setup_alerts(url)
            assert setup_alerts(url).id == automation.id  # idempotent: replaced, not duplicated
            with get_client(sync_client=True) as client:
                assert [a.id for a in client.read_automations_by_name(AUTOMATION_NAME)] == [automation.id]
                session_dep = client.read_deployment_by_name("stemstream-session/session")
                experiment_dep = client.read_deployment_by_name("stemstream-experiment/experiment")
            assert session_dep.enforce_parameter_schema
            limit = session_dep.global_concurrency_limit
            assert limit is not None and limit.limit == 1  # one session per microscope
            assert session_dep.parameters == {
                "camera": "simulated",
                "n_scans": 3,
                "duration": 0.0,
                "scan_width": 64,
                "scan_height": 64,
                "dose": 200.0,
                "nodes": 2,
                "backend": "local",
                "postprocess": True,
                "min_completeness": 0.99,
                "frame_rate": 0.0,
            }
            # A run form a microscopist can fill in: every parameter described, typed, with a concrete
            # default (no "X | None" toggle).
            props = session_dep.parameter_openapi_schema["properties"]
            assert set(props) >= set(session_dep.parameters) | {"first_scan"}
            for name, prop in props.items():
                assert prop.get("description"), f"{name} has no description"
                assert "default" in prop and prop["default"] is not None, f"{name} has no concrete default"
                assert "anyOf" not in prop, f"{name} is a union: {prop}"
            assert session_dep.work_pool_name == "stemstream-local"
            assert "{{ $STEMSTREAM_REPO }}" in json.dumps(session_dep.pull_steps)  # resolved on the worker
            crons = [(s.schedule.cron, s.schedule.timezone) for s in experiment_dep.schedules if s.active]
            assert crons == [("0 2 * * *", "America/Los_Angeles")]

            with worker_log.open("wb") as log:
                worker = subprocess.Popen(
                    [*prefect, "worker", "start", "--pool", "stemstream-local", "--name", "e2e-worker"],
                    cwd=tmp_path,  # anywhere: the pull step moves each run into the repository
                    env=worker_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

            t_run = time.monotonic()
            ok = run_deployment("stemstream-session/session", parameters=SMALL, timeout=150, poll_interval=1)
            assert ok.state is not None and ok.state.is_completed(), (
                f"{ok.state}\n{worker_log.read_text(errors='replace')[-4000:]}"
            )
            files = list((out / "sessions" / str(ok.id) / "scans").glob("*.h5"))
            assert len(files) == 1, f"expected one HDF5 file, found {files}"
            t_ok = time.monotonic()

            bad = run_deployment(
                "stemstream-session/session",
                parameters={**SMALL, "backend": "nersc"},
                timeout=120,
                poll_interval=1,
            )
            assert bad.state is not None and bad.state.is_failed(), (
                f"{bad.state}\n{worker_log.read_text(errors='replace')[-4000:]}"
            )
            assert "SFAPI credentials" in (bad.state.message or ""), bad.state.message
            _wait(lambda: received, 30, "the failure alert at the webhook")
            t_alert = time.monotonic()
            assert len(received) == 1, received  # one alert, for the failed run only
            alert = received[0]
            assert alert["path"] == "/alerts?token=not-a-secret"
            subject, body = alert["json"]["subject"], alert["json"]["body"]
            assert "stemstream-session" in subject and bad.name in subject and "Failed" in subject
            assert str(bad.id) in body and "SFAPI credentials" in body
        print(
            f"\n[e2e] server {t_server - t_start:.1f} s, deploy+worker {t_run - t_server:.1f} s, "
            f"session {t_ok - t_run:.1f} s, failing run + alert {t_alert - t_ok:.1f} s, "
            f"total {time.monotonic() - t_start:.1f} s"
        )
    finally:
        _stop(worker)  # first, so no run is left orphaned by a server that went away
        _stop(server)
        deadline = time.monotonic() + 15
        while (leftovers := _marked_pids(marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in leftovers:  # ours by the marker: end them so one failure does not leak into the next test
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert server is not None and server.returncode is not None
    assert worker is not None and worker.returncode is not None
    assert not leftovers, f"processes left running after the test: {leftovers}"
