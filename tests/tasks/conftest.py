"""Fixtures for tasks/: a real OpenSSH sshd on loopback, a real Slurm cluster on loopback, the loopback fake
SFAPI (jobs on that Slurm, or in process), SFAPI test keys."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import authlib.deprecate

# authlib warns about httpx -> httpx2 when sfapi_client imports it and forces "always" for that warning when
# authlib.deprecate is imported; so filter after importing that and before importing sfapi_client.
warnings.filterwarnings("ignore", category=authlib.deprecate.AuthlibDeprecationWarning)

import pytest  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from stemstream_testing.fake_sfapi import FakeSfapi  # noqa: E402
from stemstream_testing.slurm_cluster import SlurmCluster, SlurmClusterError  # noqa: E402
from tasks.settings import SfapiSettings, SshSettings  # noqa: E402

from .helpers import CLIENT_ID, alive, free_port, keygen, wait_until  # noqa: E402


# ---- SFAPI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sfapi_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture
def fake(tmp_path: Path, sfapi_pem: str) -> Iterator[FakeSfapi]:
    root = tmp_path / "nersc"
    root.mkdir()
    with FakeSfapi(root, clients={CLIENT_ID: sfapi_pem}, kill_grace=1.0) as fake:
        yield fake
    for job in fake.jobs.values():  # close() must have ended every process any job started
        assert not any(alive(pid) for pid in job.pids), f"job {job.jobid} left processes behind"


@pytest.fixture
def sfapi_settings(fake: FakeSfapi, sfapi_pem: str) -> SfapiSettings:
    return _sfapi_settings(fake, sfapi_pem)


def _sfapi_settings(fake: FakeSfapi, pem: str, **update: object) -> SfapiSettings:
    values: dict[str, object] = {
        "api_base_url": fake.base_url,
        "token_url": fake.token_url,
        "client_id": CLIENT_ID,
        "secret": SecretStr(pem),
        "poll_interval": 0.05,
        "submit_timeout": 5,
        "start_timeout": 5,
        "api_timeout": 5,
        "request_timeout": 2,
        "api_retries": 5,
        "retry_backoff": 0.05,
    }
    return SfapiSettings(**(values | update))


# ---- Slurm ---------------------------------------------------------------------------------------
# One cluster per pytest session, shared by tests/tasks and tests/flows (whose conftest imports these
# fixtures, which makes a second fixture definition): the first user starts it, the last one stops it.
_CLUSTER: dict[str, object] = {"cluster": None, "users": 0}
SLURM_NODES = 2


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """munged, slurmctld and two slurmd (node1, node2) on loopback, started once; every daemon stopped."""
    if _CLUSTER["cluster"] is None:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=SLURM_NODES)
        try:
            cluster.start()
        except SlurmClusterError as exc:  # a missing package must fail the tests, never skip them
            pytest.fail(f"cannot start the loopback Slurm cluster: {exc}")
        _CLUSTER["cluster"] = cluster
    _CLUSTER["users"] = int(_CLUSTER["users"]) + 1  # type: ignore[call-overload]
    cluster = _CLUSTER["cluster"]
    assert isinstance(cluster, SlurmCluster)
    try:
        yield cluster
    finally:
        _CLUSTER["users"] = int(_CLUSTER["users"]) - 1  # type: ignore[call-overload]
        if _CLUSTER["users"] == 0:
            _CLUSTER["cluster"] = None
            daemons = cluster.pids
            cluster.stop()
            left = [pid for pid in daemons if alive(pid)] + cluster.leftover_pids()
            assert not left, f"the Slurm cluster left processes behind: {left}"


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster for one test, all nodes idle; afterwards every job is cancelled, every node resumed,
    and no process of any job is left."""
    slurm_cluster.reset()
    yield slurm_cluster
    slurm_cluster.reset()
    assert wait_until(lambda: not slurm_cluster.job_processes(), timeout=slurm_cluster.kill_wait + 10), (
        f"job processes left behind: {slurm_cluster.job_processes()}"
    )


@pytest.fixture
def slurm_fake(tmp_path: Path, sfapi_pem: str, slurm: SlurmCluster) -> Iterator[FakeSfapi]:
    """The fake SFAPI in front of the real Slurm; the "remote" file system (root) has /pscratch/logs."""
    root = tmp_path / "nersc"
    (root / "pscratch" / "logs").mkdir(parents=True)
    with FakeSfapi(root, clients={CLIENT_ID: sfapi_pem}, slurm=slurm) as fake:
        yield fake
    for jobid in fake.jobs:  # close() cancelled every job it submitted and waited for its processes
        assert not slurm.job_processes(jobid), f"job {jobid} left processes behind"


@pytest.fixture
def slurm_sfapi_settings(slurm_fake: FakeSfapi, sfapi_pem: str) -> SfapiSettings:
    """Client settings for the fake in front of Slurm (polls a real squeue: 0.1 s apart)."""
    return _sfapi_settings(slurm_fake, sfapi_pem, poll_interval=0.1, start_timeout=20)


# ---- SSH -----------------------------------------------------------------------------------------
def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshSettings]:
    """A real OpenSSH server on 127.0.0.1:<free port> that accepts one ed25519 user key."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd_bin) or not shutil.which("ssh-keygen"):
        # A missing sshd must not turn the SSH tests into silent skips: .ci/run installs it.
        pytest.fail("openssh-server is not installed: run `apt-get install -y openssh-server` (.ci/run does)")
    d = tmp_path_factory.mktemp("sshd")
    keygen(d / "host_key")
    keygen(d / "user_key")
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        "LogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # the privilege-separation directory sshd wants as root
    # Absolute path: sshd re-executes itself. -D: stay in the foreground, -e: log to stderr.
    log = (d / "sshd.log").open("wb")  # a file, not a pipe nobody reads that could fill up and block sshd
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    try:
        _wait_port(port, proc, d / "sshd.log")
        kind, b64 = (d / "host_key.pub").read_text().split()[:2]
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {b64}\n")
        yield SshSettings(
            host="127.0.0.1",
            port=port,
            user=getpass.getuser(),
            key_path=d / "user_key",
            known_hosts=d / "known_hosts",
            connect_timeout=5,
            command_timeout=20,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
