"""Fixtures for the flow tests: one Prefect test harness per pytest session, stemstream settings in the
environment (as the flow reads them), and the NERSC stand-ins (loopback fake SFAPI, in front of a real
loopback Slurm cluster or of its in-process job runner; a real sshd).

Prefect reads PREFECT_HOME and the analytics switches when it is imported, so they are set here, before
anything imports prefect. The harness is not autouse: only tests that run flows ask for it (pytestmark in
test_session.py), so the CLI tests beside them do not pay for a server.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="stemstream_prefect_home_")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import pytest  # noqa: E402
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_HOME, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from stemstream_testing.fake_sfapi import FakeSfapi  # noqa: E402
from stemstream_testing.slurm_cluster import SlurmCluster  # noqa: E402
from streaming.transport.security import write_keypair  # noqa: E402
from tasks.settings import SshSettings  # noqa: E402

# Shared with tests/tasks: a real OpenSSH sshd on loopback, SFAPI client keys, the loopback fake SFAPI, the
# loopback Slurm cluster (one per pytest session) and the fake in front of it (that conftest also silences
# authlib's httpx deprecation warning before sfapi_client is first imported).
from tests.tasks.conftest import (  # noqa: E402, F401
    fake,
    sfapi_pem,
    slurm,
    slurm_cluster,
    slurm_fake,
    sshd,
)
from tests.tasks.helpers import CLIENT_ID, free_port  # noqa: E402

ENV_PREFIX = "STEMSTREAM_"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API server (fresh SQLite DB) for every flow test; heartbeats off."""
    with (
        prefect_test_harness(server_startup_timeout=90),
        temporary_settings(
            updates={
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,  # ~1 s per flow run otherwise
                PREFECT_HOME: os.environ["PREFECT_HOME"],  # also if prefect was imported before this file
            }
        ),
    ):
        yield


@pytest.fixture
def stemstream_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean STEMSTREAM_* environment with its own output directory and an empty settings file."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    output = tmp_path / "out"
    output.mkdir()
    config = tmp_path / "stemstream.toml"
    config.write_text("# empty: defaults and environment only\n")
    monkeypatch.setenv("STEMSTREAM_CONFIG", str(config))  # never a stemstream.toml of the current directory
    monkeypatch.setenv("STEMSTREAM_OUTPUT_DIR", str(output))
    return output


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (bounded: gives up after 100 draws)."""
    ports: list[int] = []
    for _ in range(100):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"could not find {n} distinct free ports")


@dataclass(frozen=True)
class NerscSetup:
    """What a nersc-backend test set up: the fake SFAPI, the sshd and the session's loopback addresses."""

    fake: FakeSfapi
    ssh: SshSettings
    output_dir: Path
    receivers: str
    nodes_bind: str
    monitor_bind: str


def set_env(monkeypatch: pytest.MonkeyPatch, section: str, **values: object) -> None:
    """STEMSTREAM_<SECTION>__<NAME>=value for each value (lists as JSON)."""
    for name, value in values.items():
        text = json.dumps(value) if isinstance(value, list) else str(value)
        monkeypatch.setenv(f"{ENV_PREFIX}{section.upper()}__{name.upper()}", text)


@pytest.fixture
def nersc(
    stemstream_env: Path,
    fake: FakeSfapi,  # noqa: F811
    sfapi_pem: str,  # noqa: F811
    sshd: SshSettings,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> NerscSetup:
    """Settings for backend=nersc: SFAPI is the loopback fake, the aggregator host is the loopback sshd."""
    return _nersc_settings(stemstream_env, fake, sfapi_pem, sshd, tmp_path, monkeypatch)


@dataclass(frozen=True)
class NerscSlurmSetup(NerscSetup):
    """A nersc-backend setup whose SFAPI submits to the real loopback Slurm cluster."""

    slurm: SlurmCluster | None = None
    curve: Path | None = None  # the CURVE key directory (aggregator and session key pairs)


@pytest.fixture
def nersc_slurm(
    stemstream_env: Path,
    slurm_fake: FakeSfapi,  # noqa: F811
    slurm: SlurmCluster,  # noqa: F811
    sfapi_pem: str,  # noqa: F811
    sshd: SshSettings,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> NerscSlurmSetup:
    """backend=nersc on real Slurm: the fake SFAPI submits to the loopback cluster (2 nodes), the batch
    script's log directory is /pscratch/logs under the fake's root, CURVE between the aggregator (started
    over SSH) and the nodes, 2 node streamers."""
    setup = _nersc_settings(stemstream_env, slurm_fake, sfapi_pem, sshd, tmp_path, monkeypatch)
    set_env(monkeypatch, "sfapi", poll_interval=0.2, pending_log_interval=1)
    set_env(monkeypatch, "session", nodes=2)
    curve = tmp_path / "curve"
    server_public, server_secret = write_keypair(curve, "aggregator")
    client_public, client_secret = write_keypair(curve, "session")
    set_env(
        monkeypatch,
        "streaming__curve",
        client_secret_file=client_secret,
        server_public_file=server_public,
        server_secret_file=server_secret,
        allowed_clients=[str(client_public)],
    )
    return NerscSlurmSetup(**setup.__dict__, slurm=slurm, curve=curve)


def _nersc_settings(
    stemstream_env: Path,
    fake: FakeSfapi,  # noqa: F811
    sfapi_pem: str,  # noqa: F811
    sshd: SshSettings,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> NerscSetup:
    key = tmp_path / "sfapi_key.pem"
    key.write_text(sfapi_pem)
    key.chmod(0o600)
    set_env(
        monkeypatch,
        "sfapi",
        api_base_url=fake.base_url,
        token_url=fake.token_url,
        client_id=CLIENT_ID,
        key_path=key,
        poll_interval=0.1,
        submit_timeout=10,
        start_timeout=30,
        api_timeout=10,
        request_timeout=3,
        api_retries=6,
        retry_backoff=0.05,
    )
    set_env(monkeypatch, "slurm", account="m1234", log_dir="/pscratch/logs", walltime="00:10:00")
    set_env(
        monkeypatch,
        "ssh",
        host=sshd.host,
        port=sshd.port,
        user=sshd.user,
        key_path=sshd.key_path,
        known_hosts=sshd.known_hosts,
        connect_timeout=5,
        command_timeout=20,
    )
    set_env(
        monkeypatch,
        "session",
        backend="nersc",
        nodes=1,
        nodes_ready_timeout=60,
        scan_timeout=60,
        aggregator_remote_command=[sys.executable, "-m", "flows.cli"],
    )
    receivers, nodes_bind, monitor_bind = (f"tcp://127.0.0.1:{port}" for port in free_ports(3))
    set_env(monkeypatch, "streaming", receivers=[receivers], nodes_bind=nodes_bind, monitor_bind=monitor_bind)
    return NerscSetup(fake, sshd, stemstream_env, receivers, nodes_bind, monitor_bind)
