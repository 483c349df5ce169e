"""A real Slurm cluster on loopback: munged, slurmctld and one slurmd per simulated node, all on this machine.

Debian's ``slurm-wlm`` (22.05) is built with multiple-slurmd support, so each simulated node is
``slurmd -N nodeI`` with its own port, spool directory and log; every node is this host (``NodeAddr=127.0.0.1``)
and only ``SLURMD_NODENAME`` tells the tasks apart. Everything (munge key and socket, slurm.conf, state,
spool, logs, the job-completion file) lives under one directory; nothing in /etc, /run or /var is touched,
and no system service is started. The daemons run in the foreground (``-D``), each in its own session, and
:meth:`SlurmCluster.stop` ends exactly the processes :meth:`start` started (their pids are recorded), and any
job step they left behind.

Configuration choices that matter here (see ../shared/notes/slurm.md): ``proctrack/linuxproc`` and
``task/none`` (cgroups are not usable in this VM), no accounting daemon (so no ``sacct``: finished jobs are
read with ``squeue -t all``/``scontrol`` while ``MinJobAge`` keeps them, then from the ``jobcomp/filetxt``
file), ``Features=cpu`` on every node (the batch script asks for ``-C cpu``), ``KillWait`` short so a
cancelled or timed-out job is gone in seconds.

Run one by hand (it prints the ``export SLURM_CONF=...`` line and serves until Ctrl-C)::

    python -m stemstream_testing.slurm_cluster --root /tmp/slurm --nodes 2
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = "slurm-wlm munge"  # the Debian packages with all of the above (scripts/install-test-deps.sh)


class SlurmClusterError(RuntimeError):
    """The cluster could not be started, or a Slurm command failed."""


def find_binary(name: str) -> str:
    """Absolute path of a Slurm or munge program; a clear error naming the package when it is missing."""
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None
    )
    if found is None:
        raise SlurmClusterError(
            f"{name} is not installed: run `bash scripts/install-test-deps.sh` "
            f"(or `apt-get install -y {PACKAGES}`)"
        )
    return found


def _free_port_block(n: int, attempts: int = 50) -> int:
    """A base port B such that B .. B+n-1 were all free on 127.0.0.1 a moment ago."""
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SlurmClusterError(f"no block of {n} free ports found")


@dataclass
class _Daemon:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None


@dataclass
class SlurmCluster:
    """munged + slurmctld + ``nodes`` slurmd on loopback under ``root``; a context manager.

    ``env`` is the environment a Slurm client command needs (``SLURM_CONF``); :meth:`run` runs one with it.
    """

    root: Path
    nodes: int = 2
    cores_per_node: int = 2
    features: tuple[str, ...] = ("cpu",)
    partition: str = "debug"
    kill_wait: int = 2
    min_job_age: int = 3600
    started_in: float | None = None  # seconds start() took
    stopped_in: float | None = None  # seconds stop() took
    _daemons: list[_Daemon] = field(default_factory=list, repr=False)
    _conf: Path | None = field(default=None, repr=False)

    # ---- paths and environment ------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        """slurm.conf (SLURM_CONF for the client commands)."""
        return self.root / "slurm.conf"

    @property
    def job_completion_file(self) -> Path:
        """One line per finished job (jobcomp/filetxt): what stands in for sacct here."""
        return self.root / "jobcomp.log"

    @property
    def node_names(self) -> list[str]:
        """node1 .. nodeN."""
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    @property
    def env(self) -> dict[str, str]:
        """What a client command (sbatch, squeue, ...) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def pids(self) -> list[int]:
        """PIDs of the daemons this cluster started (still running or not)."""
        return [d.popen.pid for d in self._daemons if d.popen is not None]

    # ---- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        """Write the configuration, start every daemon, wait until all nodes are idle."""
        t0 = time.monotonic()
        binaries = {name: find_binary(name) for name in (*DAEMONS, *CLIENTS)}
        self.root.mkdir(parents=True, exist_ok=True)
        munge_dir = self.root / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # munged refuses a socket directory others cannot reach ("inaccessible")
        key = munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        for sub in ("state", "logs", *(f"spool/{n}" for n in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        base = _free_port_block(self.nodes + 2)
        self.conf.write_text(self._slurm_conf(base))
        self._daemons = [
            _Daemon(
                "munged",
                [
                    binaries["munged"],
                    "--foreground",
                    f"--socket={munge_dir / 'munge.socket'}",
                    f"--key-file={key}",
                    f"--log-file={munge_dir / 'munged.log'}",
                    f"--pid-file={munge_dir / 'munged.pid'}",
                    f"--seed-file={munge_dir / 'munged.seed'}",
                    "--force",  # run as root, and over a stale socket of an earlier run
                ],
                self.root / "logs" / "munged.out",
            ),
            _Daemon(
                "slurmctld",
                [binaries["slurmctld"], "-D", "-i", "-f", str(self.conf)],
                self.root / "logs" / "slurmctld.out",
            ),
        ]
        self._daemons += [
            _Daemon(
                f"slurmd {n}",
                [binaries["slurmd"], "-D", "-N", n, "-f", str(self.conf)],
                self.root / "logs" / f"slurmd-{n}.out",
            )
            for n in self.node_names
        ]
        try:
            for daemon in self._daemons:
                self._spawn(daemon)
                if daemon.name == "munged":
                    self._wait(lambda: (munge_dir / "munge.socket").exists(), "munged's socket", timeout)
            self._wait(self._all_idle, f"{self.nodes} idle node(s)", timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every daemon this cluster started (slurmds first), SIGKILL what is left; idempotent.

        Job steps left running (slurmstepd and its tasks, which slurmd does not stop when it exits) are
        found by their SLURM_CONF and killed too.
        """
        t0 = time.monotonic()
        if not self._daemons:
            return
        with contextlib.suppress(Exception):  # best effort: end the jobs while slurmctld still answers
            self.run(["scancel", "--full", f"--user={getpass.getuser()}"], check=False, timeout=5)
        order = [d for d in self._daemons if d.name.startswith("slurmd")]
        order += [d for d in self._daemons if d.name == "slurmctld"]
        order += [d for d in self._daemons if d.name == "munged"]
        for group in (order[:-2], order[-2:-1], order[-1:]):
            live = [d.popen for d in group if d.popen is not None and d.popen.poll() is None]
            for p in live:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in live:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        for pid in self.leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._daemons = []
        self.stopped_in = time.monotonic() - t0

    def leftover_pids(self) -> list[int]:
        """Live processes of this cluster: its daemons (and their children) and every job's processes."""
        return sorted({pid for pid, _, _ in self._processes()})

    def job_processes(self, job_id: str | None = None) -> list[int]:
        """Live processes of jobs (slurmstepd, the batch script, srun, tasks and their children), of one job
        or of any; the daemons are not included."""
        daemons = set(self.pids)
        found = []
        for pid, pgid, env in self._processes():
            if pgid in daemons or pid in daemons:
                continue
            if (
                job_id is None
                or env.get(b"SLURM_JOB_ID") == str(job_id).encode()
                or (env.get(b"_cmdline", b"").startswith(f"slurmstepd: [{job_id}.".encode()))
            ):
                found.append(pid)
        return found

    def _processes(self) -> list[tuple[int, int, dict[bytes, bytes]]]:
        """(pid, pgid, environment) of live processes whose environment names this cluster's slurm.conf
        (every daemon, step daemon and task gets SLURM_CONF) or whose command line does."""
        mine = str(self.conf).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] in ("Z", "X"):
                    continue
                cmdline = (entry / "cmdline").read_bytes()
                environ = b""
                with contextlib.suppress(OSError):
                    environ = (entry / "environ").read_bytes()
            except (OSError, IndexError):
                continue
            env = dict(kv.partition(b"=")[::2] for kv in environ.split(b"\0") if b"=" in kv)
            if mine in cmdline or env.get(b"SLURM_CONF") == mine:
                env[b"_cmdline"] = cmdline.replace(b"\0", b" ").strip()
                found.append((int(entry.name), int(stat[2]), env))
        return found

    def _spawn(self, daemon: _Daemon) -> None:
        env = {**os.environ, **self.env}
        with open(daemon.log, "ab") as out:
            daemon.popen = subprocess.Popen(
                daemon.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [d for d in self._daemons if d.popen is not None and d.popen.poll() is not None]
            if dead:
                d = dead[0]
                raise SlurmClusterError(
                    f"{d.name} exited with code {d.popen.returncode} while waiting for {what}:\n"
                    + _tail(d.log)
                    + _tail(self.root / "logs" / f"{d.name.split()[0]}.log")
                )
            with contextlib.suppress(SlurmClusterError, subprocess.TimeoutExpired):
                if ready():
                    return
            time.sleep(0.1)
        logs = "".join(_tail(p) for p in sorted((self.root / "logs").glob("*.log")))
        raise SlurmClusterError(f"the Slurm cluster did not reach {what} within {timeout:g} s\n{logs}")

    def _all_idle(self) -> bool:
        states = self.node_states()
        return len(states) == self.nodes and all(s == "idle" for s in states.values())

    # ---- configuration --------------------------------------------------------------------------
    def _slurm_conf(self, base: int) -> str:
        r = self.root
        user = getpass.getuser()
        host = socket.gethostname().split(".")[0]
        n = self.nodes
        return f"""\
# A loopback test cluster (stemstream_testing/slurm_cluster.py); every node is this host.
ClusterName=stemstream
SlurmctldHost=localhost
SlurmctldPort={base}
SlurmdPort={base + 1}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/logs/slurmctld.log
SlurmdLogFile={r}/logs/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# cgroups are not usable in this VM: processes are tracked by parentage, tasks are not bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
# no slurmdbd: no sacct; finished jobs stay in squeue/scontrol for MinJobAge s, then in the jobcomp file
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.job_completion_file}
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait={self.kill_wait}
MinJobAge={self.min_job_age}
MailProg=/bin/true
NodeName=node[1-{n}] NodeHostname={host} NodeAddr=127.0.0.1 Port={base + 2}-{base + 1 + n} \
Sockets=1 CoresPerSocket={self.cores_per_node} ThreadsPerCore=1 RealMemory=1000 \
Features={",".join(self.features) or "none"} State=UNKNOWN
PartitionName={self.partition} Nodes=node[1-{n}] Default=YES MaxTime=INFINITE State=UP
"""

    # ---- client commands ------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 30.0,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster (``env`` replaces the environment when given)."""
        base = dict(os.environ) if env is None else dict(env)
        proc = subprocess.run(
            [find_binary(argv[0]), *argv[1:]],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**base, **self.env},
        )
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                f"{shlex_join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def node_states(self) -> dict[str, str]:
        """Each node's state as sinfo prints it (idle, alloc, down*, drain, ...)."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=5).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, ExitCode, BatchHost, ...); {} when unknown."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False, timeout=10)
        if proc.returncode != 0:
            return {}
        return parse_scontrol(proc.stdout)

    def completed_job(self, job_id: str) -> dict[str, str]:
        """The job's line in the job-completion file (JobState, ExitCode, StartTime, ...); {} if not there.

        What stands in for sacct once MinJobAge has passed (there is no accounting daemon)."""
        try:
            lines = self.job_completion_file.read_text().splitlines()
        except OSError:
            return {}
        for line in reversed(lines):
            if line.startswith(f"JobId={job_id} "):
                return parse_scontrol(line)
        return {}

    def steps(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show step`` of the job's steps (one dict each; [] when none run)."""
        proc = self.run(["scontrol", "-o", "show", "step", str(job_id)], check=False, timeout=10)
        return [parse_scontrol(line) for line in proc.stdout.splitlines() if line.startswith("StepId=")]

    def set_node_state(self, node: str, state: str, reason: str = "stemstream test") -> None:
        """``scontrol update nodename=NODE state=STATE`` (down and drain need a reason)."""
        argv = ["scontrol", "update", f"nodename={node}", f"state={state}"]
        if state.lower() in ("down", "drain", "fail"):
            argv.append(f"reason={reason}")
        self.run(argv, timeout=10)

    def reset(self, timeout: float = 30.0) -> None:
        """Between tests: cancel every job, resume every node that is not idle, wait until all are idle.

        A job process that outlives its job's KillWait (an orphan: proctrack/linuxproc follows parentage,
        so a process whose parent died escapes it, where cgroups would not) is killed here."""
        self.run(["scancel", "--full", f"--user={getpass.getuser()}"], check=False, timeout=10)
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            if time.monotonic() - start > self.kill_wait + 3:
                for pid in self.job_processes():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            states = self.node_states()
            if all(s == "idle" for s in states.values()) and len(states) == self.nodes:
                return
            for node, state in states.items():
                if state.rstrip("*~#!%$@^-") in ("down", "drain", "drng", "fail", "failg"):
                    self.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
            time.sleep(0.2)
        raise SlurmClusterError(f"nodes not idle after reset: {self.node_states()}")

    def wait_job(self, job_id: str, states: set[str] | frozenset[str], timeout: float = 30.0) -> str:
        """Block until the job's state is one of states (test helper); its state, or SlurmClusterError."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job(job_id).get("JobState", "")
            if state in states:
                return state
            time.sleep(0.1)
        raise SlurmClusterError(
            f"job {job_id} is {state or 'unknown'}, not {sorted(states)}, after {timeout:g} s"
        )


def parse_scontrol(line: str) -> dict[str, str]:
    """``scontrol -o show job|step|node`` output (one line of Key=Value words) as a dict.

    Values may contain spaces only in a few keys (Reason, Command, WorkDir with spaces); a word without
    ``=`` belongs to the value before it."""
    out: dict[str, str] = {}
    last = None
    for word in line.strip().split(" "):
        key, eq, value = word.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9_:/]*", key):
            out[key] = value
            last = key
        elif last is not None:
            out[last] += " " + word
    return out


def shlex_join(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(str(a) for a in argv)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"--- {path.name}\n" + "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Start a cluster, print how to use it, serve until interrupted, stop every daemon."""
    parser = argparse.ArgumentParser(prog="python -m stemstream_testing.slurm_cluster", description=__doc__)
    parser.add_argument("--root", required=True, type=Path, help="directory for its state (created)")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with SlurmCluster(args.root.resolve(), nodes=args.nodes) as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        print(
            f"# {cluster.nodes} node(s) idle after {cluster.started_in:.1f} s; Ctrl-C stops every daemon",
            file=sys.stderr,
            flush=True,
        )
        while not stop:
            time.sleep(0.2)
    print(f"# stopped in {cluster.stopped_in:.1f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
