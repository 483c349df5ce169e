"""Fixtures shared by every test folder, and how the suite runs on pytest-xdist workers.

Shared fixtures: a real OpenSSH sshd on loopback, SFAPI client keys, the loopback fake SFAPI, the loopback
Slurm cluster (one per pytest process) and the fake in front of it, one Prefect test harness per pytest
process, and a clean STEMSTREAM_* environment.

Prefect reads PREFECT_HOME and the analytics switches when it is imported, and authlib forces its httpx
deprecation warning on when authlib.deprecate is imported; so both are set up here, before anything imports
prefect or sfapi_client.

Workers (``pytest -n 3 --dist loadgroup``): the tests that share an expensive daemon or a module-scoped
fixture carry an ``xdist_group`` (added at collection, below), so that daemon or fixture is started on one
worker only: ``slurm`` (the loopback Slurm cluster), ``postgres`` (the PostgreSQL server), ``prefect-stack``
(real `prefect server` + deploy + worker), and one group per module with a module-scoped fixture. Tests whose
assertions are about wall-clock rates or latencies are marked ``serial`` and run after the others, alone.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

# Bytecode: where PYTHONDONTWRITEBYTECODE is set (this machine's image sets it), each of the suite's few
# hundred Python processes compiled stemstream from source (0.3 s each) and each pytest process rewrote the
# test modules' asserts again (7 s): the suite writes __pycache__ (git ignores it), for itself and the
# processes it starts.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="stemstream_prefect_home_")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import authlib.deprecate  # noqa: E402

# authlib warns about httpx -> httpx2 when sfapi_client imports it and forces "always" for that warning when
# authlib.deprecate is imported; so filter after importing that and before importing sfapi_client.
warnings.filterwarnings("ignore", category=authlib.deprecate.AuthlibDeprecationWarning)

import pytest  # noqa: E402
from _pytest.nodeid import coerce_node_id  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from stemstream_testing.fake_sfapi import FakeSfapi  # noqa: E402
from stemstream_testing.slurm_cluster import SlurmCluster, SlurmClusterError  # noqa: E402
from stemstream_testing.support import alive, free_port, stop_process, wait_until  # noqa: E402
from tasks.settings import SshSettings  # noqa: E402
from tests.tasks.helpers import CLIENT_ID, keygen, wait_port  # noqa: E402

ENV_PREFIX = "STEMSTREAM_"
SLURM_NODES = 2

# ---- xdist groups and the serial marker ----------------------------------------------------------------
# Modules whose module-scoped fixtures are worth making once (a server stack, a browser, analysed scans):
# all their tests go to one worker.
_MODULE_GROUPS = {
    "tests/tasks/test_postprocess.py",
    "tests/tasks/test_calibrated_analysis.py",
    "tests/tasks/test_verify.py",
    "tests/flows/test_cli_counting.py",
    "tests/counting/test_live_images.py",
    "tests/counting/test_raw.py",
}
# Real `prefect server` + `prefect deploy` + a worker: one stack at a time, on one worker.
_PREFECT_STACK = {
    "tests/flows/test_deployment.py",
    "tests/flows/test_prefect_ui.py",
    "tests/catalogue/test_analyse_deployment.py",
}


def _group(item: pytest.Item) -> str | None:
    """The xdist group of a test: the daemon or module fixture it shares, if any."""
    path = item.nodeid.split("::", 1)[0]
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    if "slurm_cluster" in names:
        return "slurm"
    if path in _PREFECT_STACK:
        return "prefect-stack"
    if "postgres" in names or (callspec is not None and callspec.params.get("db_url") == "postgresql"):
        return "postgres"
    if path in _MODULE_GROUPS:
        return path.rsplit("/", 1)[1].removesuffix(".py")
    return None


# The longest groups first, then the tests that run sessions: xdist hands out work in collection order, so a
# long group collected last would run alone at the end.
_FIRST = ("prefect-stack", "slurm")


def _order(item: pytest.Item) -> tuple[int, int]:
    group = _group(item)
    names = getattr(item, "fixturenames", ())
    if group in _FIRST:
        # the shared stack's users one after another, so it is started once (see shared_prefect_stack)
        return _FIRST.index(group), SHARED_STACK in names
    return len(_FIRST) + ("prefect_harness" not in names), 0


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = _group(item)
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
    if getattr(config.option, "loadgroup", False):  # an xdist worker, --dist loadgroup
        items.sort(key=_order)  # stable: each file's own order is kept


# ---- one real Prefect stack for the modules that only use it ----------------------------------------------
SHARED_STACK = "shared_prefect_stack"


class SharedStack:
    """A real `prefect server` (with the UI) + `prefect deploy --all` + a process worker, started on first use
    and stopped as soon as the next test does not use it (pytest_runtest_teardown below), so the modules
    that share it (the UI test, the analyse deployment) pay its start-up once, and no idle worker polls the
    rest of the run."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._exit: contextlib.ExitStack | None = None
        self._stack = None

    def get(self):
        """The running stack (a tests.flows.prefect_processes.PrefectStack), started if need be."""
        if self._stack is None:
            from tests.flows.prefect_processes import prefect_stack

            self._exit = contextlib.ExitStack()
            self._stack = self._exit.enter_context(prefect_stack(self._factory.mktemp("prefect_stack")))
        return self._stack

    def close(self) -> None:
        """Stop every process of the stack (asserts none is left running)."""
        exit_stack, self._exit, self._stack = self._exit, None, None
        if exit_stack is not None:
            exit_stack.close()


_shared_stacks: list[SharedStack] = []


@pytest.fixture(scope="session")
def shared_prefect_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedStack]:
    """The session's SharedStack: call .get() for the running stack."""
    shared = SharedStack(tmp_path_factory)
    _shared_stacks.append(shared)
    yield shared
    shared.close()


@pytest.hookimpl(trylast=True)  # after pytest's own teardown of this test's fixtures (module ones too)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or SHARED_STACK not in getattr(nextitem, "fixturenames", ()):
        for shared in _shared_stacks:
            shared.close()


@pytest.hookimpl(tryfirst=True)  # before xdist sends the node ids to the controller
def pytest_collection_finish(session: pytest.Session) -> None:
    _name_groups(session.config, session.items)


def _name_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The xdist group as the node id's "@group" suffix, which is what --dist loadgroup schedules by.

    pytest-xdist 3.8 writes that suffix to ``item._nodeid``, which pytest 9 no longer reads (node ids live
    in ``item._id``): without this every test would be scheduled on its own and the groups ignored.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        if not names or "@" in item.nodeid.rsplit("::", 1)[-1] or not hasattr(item, "_id"):
            continue  # no group, already named (an older pytest), or a pytest without _id
        item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


# ---- SFAPI ----------------------------------------------------------------------------------------------
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


# ---- Slurm ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """munged, slurmctld and two slurmd (node1, node2) on loopback, started once per pytest process (the
    tests using it share the ``slurm`` xdist group, so one worker); every daemon stopped at the end."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=SLURM_NODES)
    try:
        cluster.start()
    except SlurmClusterError as exc:  # a missing package must fail the tests, never skip them
        pytest.fail(f"cannot start the loopback Slurm cluster: {exc}")
    try:
        yield cluster
    finally:
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


# ---- SSH ------------------------------------------------------------------------------------------------
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
        wait_port(port, proc, d / "sshd.log")
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
        stop_process(proc)
        log.close()


# ---- Prefect and the stemstream environment -------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API server (fresh SQLite DB) per pytest process for the flow tests; heartbeats
    off."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

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


def set_env(monkeypatch: pytest.MonkeyPatch, section: str, **values: object) -> None:
    """STEMSTREAM_<SECTION>__<NAME>=value for each value (lists as JSON)."""
    for name, value in values.items():
        text = json.dumps(value) if isinstance(value, list) else str(value)
        monkeypatch.setenv(f"{ENV_PREFIX}{section.upper()}__{name.upper()}", text)


# The test profile: small node memory (4 slots of 8 frames: 21 MB of shared memory per node instead of 340 MB)
# and no live view, where a test checks neither. It is a settings file (the lowest layer above the defaults),
# so whatever a test sets in the environment or writes to the file wins. Tests marked product_defaults get
# an empty file: the product's defaults.
TEST_PROFILE = """# the test profile (tests/conftest.py): small node memory, no live view
[streaming]
node_slots = 4
node_batch = 8

[streaming.live]
enabled = false
"""


@pytest.fixture
def stemstream_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """A clean STEMSTREAM_* environment with its own output directory and a settings file with the test
    profile (empty for tests marked product_defaults).

    The live view's snapshot socket gets a port of this test's own (the default, 17020, is one port for
    every session on the machine, and tests run side by side on xdist workers) and its page any free port.
    """
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    output = tmp_path / "out"
    output.mkdir()
    config = tmp_path / "stemstream.toml"
    if request.node.get_closest_marker("product_defaults") is None:
        config.write_text(TEST_PROFILE)
    else:
        config.write_text("# empty: defaults and environment only\n")
    monkeypatch.setenv("STEMSTREAM_CONFIG", str(config))  # never a stemstream.toml of the current directory
    monkeypatch.setenv("STEMSTREAM_OUTPUT_DIR", str(output))
    set_env(monkeypatch, "streaming__live", bind=f"tcp://127.0.0.1:{free_port()}", page_port=0)
    return output
