"""End to end as operators run it: `prefect server start`, the repo's prefect.yaml deployed with
`prefect deploy`, a process worker, failure alerts to a webhook. Loopback only, every process stopped."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.flows.prefect_processes import (
    REPO,
    base_env,
    deploy,
    free_port,
    kill_marked,
    start_server,
    start_worker,
    stop,
    wait_for,
)

SMALL = {"n_scans": 1, "scan_width": 8, "scan_height": 8, "postprocess": False}


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
        # The nersc run must fail for want of SFAPI credentials, at once, and never leave loopback. A Slurm
        # account is set so that it gets that far: without one, allocate-nodes retries the SlurmConfigError
        # twice (25 s) before failing (see _retry_transient in tasks/steps/session.py).
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
        server = start_server(port, env, tmp_path, server_log)  # no UI, no scheduler
        t_server = time.monotonic()
        deploy(env, cli_log)
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

            worker = start_worker(worker_env, tmp_path, worker_log)

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
            wait_for(lambda: received, 30, "the failure alert at the webhook")
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
        stop(worker)  # first, so no run is left orphaned by a server that went away
        stop(server)
        leftovers = kill_marked(marker)
    assert server is not None and server.returncode is not None
    assert worker is not None and worker.returncode is not None
    assert not leftovers, f"processes left running after the test: {leftovers}"
