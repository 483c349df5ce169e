"""Fixtures for the flow tests: the NERSC stand-ins (loopback fake SFAPI, in front of a real loopback Slurm
cluster or of its in-process job runner; a real sshd) as stemstream settings in the environment (as the flow
reads them). The Prefect harness, the clean environment (stemstream_env), the sshd, the fake SFAPI and the
Slurm cluster are shared fixtures in tests/conftest.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from stemstream_testing.fake_sfapi import FakeSfapi
from stemstream_testing.slurm_cluster import SlurmCluster
from stemstream_testing.support import free_ports
from streaming.transport.security import write_keypair
from tasks.settings import SshSettings
from tests.conftest import set_env
from tests.tasks.helpers import CLIENT_ID

__all__ = ["NerscSetup", "NerscSlurmSetup", "set_env"]


@dataclass(frozen=True)
class NerscSetup:
    """What a nersc-backend test set up: the fake SFAPI, the sshd and the session's loopback addresses."""

    fake: FakeSfapi
    ssh: SshSettings
    output_dir: Path
    receivers: str
    nodes_bind: str
    monitor_bind: str


@pytest.fixture
def nersc(
    stemstream_env: Path,
    fake: FakeSfapi,
    sfapi_pem: str,
    sshd: SshSettings,
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
    slurm_fake: FakeSfapi,
    slurm: SlurmCluster,
    sfapi_pem: str,
    sshd: SshSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> NerscSlurmSetup:
    """backend=nersc on real Slurm: the fake SFAPI submits to the loopback cluster (2 nodes), the batch
    script's log directory is /pscratch/logs under the fake's root, CURVE between the aggregator (started
    over SSH) and the nodes, 2 node streamers."""
    setup = _nersc_settings(stemstream_env, slurm_fake, sfapi_pem, sshd, tmp_path, monkeypatch)
    # every job-state query is an HTTP request to the fake SFAPI and a squeue there: 0.5 s, not 0.2 s, halves
    # what the Slurm tests spend polling (they wait minutes on Slurm) and adds at most 0.3 s to a reaction
    set_env(monkeypatch, "sfapi", poll_interval=0.5, pending_log_interval=1)
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
    fake: FakeSfapi,
    sfapi_pem: str,
    sshd: SshSettings,
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
