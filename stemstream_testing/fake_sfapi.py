"""A loopback fake of the NERSC Superfacility API (v1.2) whose jobs really run: on a real Slurm, or as
local processes.

It speaks the wire format sfapi_client 0.6 uses, so the real client (OAuth, HTTP, parsing) is exercised:
``POST /token`` (client_credentials + private_key_jwt), ``GET status[/<machine>]``,
``POST/GET/DELETE compute/jobs/<machine>[/<id>]`` (sbatch, squeue/sacct, scancel), ``GET tasks/<id>`` and
``GET utilities/download/<machine>/<path>``. "Remote" (Perlmutter) paths in ``#SBATCH -o`` and downloads
map under ``root``.

**On a real Slurm** (``slurm=SlurmCluster(...)``, stemstream_testing/slurm_cluster.py): a submission is
``sbatch --parsable`` of the script as sent (run in ``root`` with a login-like environment, never the
caller's, and ``--output`` mapped under ``root``; sbatch does not create that directory, as on Perlmutter);
its error, if any, is the task's error. squeue queries are ``squeue -j``; sacct queries (there is no
accounting daemon) are ``scontrol show job`` while ``MinJobAge`` keeps the job, then the job-completion
file; DELETE is ``scancel``. States, reasons and exit codes are Slurm's own. ``close()`` cancels every job
this fake submitted. Faults are made with Slurm itself (``scontrol update nodename=... state=down``).

**In process** (no ``slurm``), for unit tests that need speed or states Slurm cannot be asked for: a
submitted batch script is parsed (``#SBATCH`` options, ``export NAME=value`` lines and ``srun``
lines). The job stays PENDING for ``pending_polls`` state queries, then goes RUNNING and each srun line
starts its tasks as local processes (``subprocess.Popen``, one process group each) with the script's exports
on top of the fake's environment plus ``SLURM_PROCID``/``SLURM_NODEID``/``SLURM_JOB_ID``/... per task.
srun lines run one after another (a trailing ``&`` starts one without waiting). All tasks exiting 0 makes the
job COMPLETED, a non-zero exit FAILED (``--kill-on-bad-exit`` stops the other tasks at once), the walltime
TIMEOUT. A job without srun lines just holds its "nodes" until cancelled or out of walltime. Cancelling
(DELETE), a forced terminal state or ``close()`` sends SIGTERM to every process group and SIGKILL after
``kill_grace`` seconds, and records the exit codes.

Not modelled in process (Slurm does all of it): the rest of the script (it is never run by a shell),
``$VAR`` expansion in exports, job arrays, heterogeneous jobs, requeueing after a node failure, a missing
``-o`` directory (the in-process runner creates it), a task's orphaned child keeping its step alive.

Faults, as options: ``fail_next_requests(n, status)``, ``delay_responses(seconds)``, ``expire_tokens()``,
``reject_next_submit(message)``, ``error_next_queries(n)`` (both modes); ``pending_polls``,
``stuck_pending``, ``set_state(job_id, "NODE_FAIL")`` (in process only). ``jobs`` and ``requests`` are there
for assertions.

CLI for manual demos: ``python -m stemstream_testing.fake_sfapi --root DIR --port 0 [--slurm DIR --nodes 2]``
prints the base URL (and, with --slurm, starts a loopback Slurm cluster for its jobs and stops it after).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import itertools
import json
import logging
import os
import posixpath
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from stemstream_testing.slurm_cluster import SlurmCluster

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1.2"
TOKEN_PATH = "/token"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# Spelled out here rather than imported from tasks.nersc.sfapi on purpose: the fake models the server on its own,
# so a wrong state set in the client is caught by the tests instead of being mirrored by the fake.
QUEUED_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED"})
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)

_SBATCH_ALIASES = {
    "-N": "nodes",
    "--nodes": "nodes",
    "-q": "qos",
    "--qos": "qos",
    "-A": "account",
    "--account": "account",
    "-C": "constraint",
    "--constraint": "constraint",
    "-t": "time",
    "--time": "time",
    "-J": "job_name",
    "--job-name": "job_name",
    "-o": "output",
    "--output": "output",
    "--reservation": "reservation",
    "--exclusive": "exclusive",
    "--no-requeue": "no_requeue",
    "--requeue": "requeue",
}
_SBATCH_FLAGS = {"--exclusive", "--no-requeue", "--requeue"}
# srun options that take a value as the next word when written without "=".
_SRUN_VALUED = {
    "-N", "--nodes", "-n", "--ntasks", "--ntasks-per-node", "-c", "--cpus-per-task", "-J", "--job-name",
    "-o", "--output", "-e", "--error", "-t", "--time", "-C", "--constraint", "-A", "--account", "-q",
    "--qos", "-p", "--partition", "-w", "--nodelist", "-x", "--exclude", "-D", "--chdir", "-m",
    "--distribution", "--cpu-bind", "--mem", "-G", "--gpus", "--gpus-per-node", "--mpi",
}  # fmt: skip


# squeue format codes -> the field names SFAPI's squeue output uses (sfapi_client's JobSqueue model).
_SQUEUE_FIELDS = (
    ("%i", "jobid"),
    ("%T", "state"),
    ("%j", "name"),
    ("%q", "qos"),
    ("%a", "account"),
    ("%u", "user"),
    ("%D", "nodes"),
    ("%r", "reason"),
    ("%V", "submit_time"),
    ("%S", "start_time"),
    ("%M", "time"),
    ("%l", "time_limit"),
    ("%N", "nodelist"),
    ("%P", "partition"),
)
# scontrol / job-completion keys -> sacct's field names (sfapi_client's JobSacct model).
_SACCT_FIELDS = (
    ("JobState", "state"),
    ("Reason", "reason"),
    ("ExitCode", "exitcode"),
    ("JobName", "jobname"),
    ("Name", "jobname"),
    ("Account", "account"),
    ("QOS", "qos"),
    ("NumNodes", "nnodes"),
    ("NodeCnt", "nnodes"),
    ("NodeList", "nodelist"),
    ("RunTime", "elapsed"),
    ("SubmitTime", "submit"),
    ("StartTime", "start"),
    ("EndTime", "end"),
    ("TimeLimit", "timelimit"),
    ("Partition", "partition"),
)


class FakeSfapiError(RuntimeError):
    """The fake was given a script or an option it cannot model."""


class _SlurmCommandError(RuntimeError):
    """A Slurm client command failed (slurmctld busy or down): SFAPI answers status ERROR."""


@dataclass
class SrunStep:
    """One parsed ``srun`` line: how many tasks on how many nodes, and the argv each task runs."""

    argv: list[str]
    nodes: int
    ntasks: int
    kill_on_bad_exit: bool = False
    background: bool = False


@dataclass
class FakeJob:
    """A submitted job as the fake sees it; read it in tests, change it only through the fake."""

    jobid: str
    script: str
    directives: dict[str, str]
    env: dict[str, str]
    steps: list[SrunStep]
    nodes: int
    walltime: float | None
    output: Path
    state: str = "PENDING"  # in process; on Slurm, ask FakeSfapi.job_state (this stays "SLURM")
    slurm: bool = False  # submitted to a real Slurm (its processes are Slurm's, not in ``processes``)
    polls: int = 0
    pinned: bool = False  # a state forced by set_state: the fake no longer advances it
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)  # SLURM_PROCID of each process, same order
    started_at: float | None = None
    ended_at: float | None = None
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    monitor: threading.Thread | None = field(default=None, repr=False)

    @property
    def qos(self) -> str | None:
        """The #SBATCH -q value."""
        return self.directives.get("qos")

    @property
    def pids(self) -> list[int]:
        """PIDs of every process the job started (all steps)."""
        return [p.pid for p in self.processes]

    @property
    def exit_codes(self) -> list[int | None]:
        """Exit code per process (negative: killed by that signal; None: still running)."""
        return [p.returncode for p in self.processes]


class FakeSfapi:
    """Loopback SFAPI on 127.0.0.1 whose jobs run as local processes; use as a context manager."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pending_polls: int = 1,
        stuck_pending: bool = False,
        clients: Mapping[str, str | bytes | dict[str, Any]] | None = None,
        token_lifetime: float = 600.0,
        kill_grace: float = 2.0,
        env: Mapping[str, str] | None = None,
        machines: tuple[str, ...] = ("perlmutter",),
        slurm: SlurmCluster | None = None,
    ) -> None:
        self.root = Path(root)
        self.slurm = slurm  # jobs go to this real Slurm; None: the in-process job runner
        self.pending_polls = pending_polls
        self.stuck_pending = stuck_pending
        self.token_lifetime = token_lifetime
        self.kill_grace = kill_grace
        self.env = dict(env or {})
        self.machines = machines
        self.status = "active"  # what GET status/<machine> reports: active | degraded | unavailable
        self.jobs: dict[str, FakeJob] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.issued_tokens: list[str] = []
        self.assertions: list[str] = []  # client assertions (JWTs) received, to check they never leak
        self._client_keys = {cid: _public_key(key) for cid, key in (clients or {}).items()}
        self._tokens: dict[str, float] = {}  # valid token -> expiry (monotonic)
        self._fail: list[tuple[int, str | None]] = []  # (status, route) for the next matching requests
        self._delay = 0.0
        self._submit_errors: list[str] = []
        self._query_errors: list[str] = []
        self._ids = itertools.count(50_000_001)
        self._lock = threading.RLock()
        self._closed = False
        self.httpd = ThreadingHTTPServer((host, port), _handler_class(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://{host}:{self.port}{API_PREFIX}"
        self.token_url = f"http://{host}:{self.port}{TOKEN_PATH}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-sfapi", daemon=True
        )
        self._thread.start()

    # ---- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> FakeSfapi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and kill every process any job started; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            jobs = list(self.jobs.values())
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.slurm is not None:
            self._close_slurm_jobs([job.jobid for job in jobs if job.slurm])
        for job in (j for j in jobs if not j.slurm):
            with self._lock:
                if job.state not in TERMINAL_STATES:
                    job.state = "CANCELLED"
                    job.ended_at = time.monotonic()
            self._stop_job(job)
        for job in jobs:
            if job.monitor is not None:
                job.monitor.join(timeout=self.kill_grace + 5)

    # ---- fault injection and controls -------------------------------------------------------------
    def fail_next_requests(self, n: int, status: int = 503, route: str | None = None) -> None:
        """Answer the next n requests whose path contains route (default: any, token included) with status."""
        with self._lock:
            self._fail.extend([(status, route)] * n)

    def delay_responses(self, seconds: float) -> None:
        """Delay every response by this many seconds (0 to stop)."""
        self._delay = seconds

    def expire_tokens(self) -> None:
        """Revoke every token issued so far: the next call with one gets 401."""
        with self._lock:
            self._tokens.clear()

    def error_next_queries(
        self, n: int, message: str = "slurm_load_jobs error: Socket timed out on send/recv operation"
    ) -> None:
        """Answer the next n squeue/sacct queries with status ERROR (what a busy slurmctld causes)."""
        with self._lock:
            self._query_errors.extend([message] * n)

    def reject_next_submit(
        self, message: str = "sbatch: error: Batch job submission failed: Invalid qos"
    ) -> None:
        """Make the next submission fail the way a rejected sbatch does (task result status error)."""
        with self._lock:
            self._submit_errors.append(message)

    def issue_token(self) -> str:
        """A valid bearer token without the OAuth round trip (for sfapi_client's access_token mode)."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime
            self.issued_tokens.append(token)
        return token

    def set_state(self, jobid: str, state: str) -> None:
        """Force a job's state; a terminal state (NODE_FAIL, ...) also kills its processes (in process only)."""
        job = self.jobs[str(jobid)]
        if job.slurm:
            raise FakeSfapiError(
                f"job {jobid} runs on a real Slurm: change it with Slurm (scontrol update nodename=... "
                "state=down, scancel), not set_state"
            )
        with self._lock:
            job.state = state
            job.pinned = True
            if state in TERMINAL_STATES:
                job.ended_at = time.monotonic()
        if state in TERMINAL_STATES:
            self._stop_job(job)

    def job_state(self, jobid: str) -> str:
        """The job's state as the server sees it (Slurm's, or the in-process runner's); "" if unknown."""
        job = self.jobs.get(str(jobid))
        if job is not None and job.slurm and self.slurm is not None:
            return self._slurm_row(str(jobid)).get("state", "")
        return job.state if job is not None else ""

    def job_pids(self, jobid: str) -> list[int]:
        """The job's live processes (on Slurm: its slurmstepd and tasks) or, in process, every one it started."""
        job = self.jobs[str(jobid)]
        if job.slurm and self.slurm is not None:
            return self.slurm.job_processes(str(jobid))
        return job.pids

    def wait_state(self, jobid: str, states: set[str] | frozenset[str], timeout: float = 10.0) -> str:
        """Block until the job is in one of these states (test helper); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(jobid)
            if state in states:
                return state
            time.sleep(0.02 if self.slurm is None else 0.1)
        raise TimeoutError(f"job {jobid} still {state} after {timeout}s")

    # ---- HTTP ------------------------------------------------------------------------------------
    def _handle(self, h: _Handler, method: str) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.requests.append((method, path))
        body = h.read_body()
        if self._delay:
            time.sleep(self._delay)
        fail = self._injected_failure(path)
        if fail is not None:
            return h.send_json(fail, {"detail": f"fake SFAPI: injected HTTP {fail}"})
        if method == "POST" and path == TOKEN_PATH:
            return self._token(h, parse_qs(body.decode()))
        if not path.startswith(API_PREFIX + "/"):
            return h.send_json(404, {"detail": f"no route {path}"})
        rest = path[len(API_PREFIX) + 1 :]
        if not rest.startswith("status") and not self._authorized(h.headers.get("authorization", "")):
            return h.send_json(401, {"detail": "Not authenticated"})
        return self._dispatch(h, method, rest, parse_qs(url.query), body)

    def _injected_failure(self, path: str) -> int | None:
        with self._lock:
            for i, (status, route) in enumerate(self._fail):
                if route is None or route in path:
                    del self._fail[i]
                    return status
        return None

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        with self._lock:
            expiry = self._tokens.get(token)
        return scheme.lower() == "bearer" and expiry is not None and expiry > time.monotonic()

    def _token(self, h: _Handler, form: dict[str, list[str]]) -> None:
        """client_credentials grant authenticated with a private_key_jwt client assertion."""
        assertion = (form.get("client_assertion") or [""])[0]
        if assertion:
            self.assertions.append(assertion)
        error = _check_assertion(form, assertion, self.token_url, self._client_keys)
        if error:
            return h.send_json(401, {"error": "invalid_client", "error_description": error})
        token = self.issue_token()
        return h.send_json(
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": max(1, int(self.token_lifetime)),
                "scope": "fake",
            },
        )

    def _dispatch(
        self, h: _Handler, method: str, rest: str, query: dict[str, list[str]], body: bytes
    ) -> None:
        parts = rest.split("/")
        if method == "GET" and parts[0] == "status":
            return self._status(h, parts[1] if len(parts) > 1 else None)
        if method == "GET" and parts[:2] == ["utilities", "download"] and len(parts) >= 4:
            return self._download(h, parts[2], "/".join(parts[3:]))
        if method == "GET" and parts[0] == "tasks" and len(parts) == 2:
            task = self.tasks.get(parts[1])
            return h.send_json(200 if task else 404, task or {"detail": f"no task {parts[1]}"})
        if parts[:2] == ["compute", "jobs"] and len(parts) >= 3:
            if parts[2] not in self.machines:
                return h.send_json(404, {"detail": f"unknown machine {parts[2]}"})
            if method == "POST" and len(parts) == 3:
                return self._submit(h, parse_qs(body.decode()))
            if method == "GET" and len(parts) == 3:
                return self._query(h, query)
            if method == "DELETE" and len(parts) == 4:
                return self._cancel(h, parts[3])
        return h.send_json(404, {"detail": f"fake SFAPI has no route {method} {rest}"})

    def _status(self, h: _Handler, machine: str | None) -> None:
        def one(name: str) -> dict[str, Any]:
            return {
                "name": name,
                "full_name": name.title(),
                "description": f"System is {self.status}",
                "system_type": "compute",
                "notes": [],
                "status": self.status,
                "updated_at": "2026-01-01T00:00:00+00:00",
            }

        if machine is None:
            return h.send_json(200, [one(m) for m in self.machines])
        if machine not in self.machines:
            return h.send_json(404, {"detail": f"unknown machine {machine}"})
        return h.send_json(200, one(machine))

    def _task(self, result: dict[str, Any]) -> str:
        task_id = str(next(self._ids))
        self.tasks[task_id] = {"id": task_id, "status": "completed", "result": json.dumps(result)}
        return task_id

    def _download(self, h: _Handler, machine: str, path: str) -> None:
        """utilities/download: a text file of the "remote" file system (under root)."""
        if machine not in self.machines:
            return h.send_json(404, {"detail": f"unknown machine {machine}"})
        local = self._local(posixpath.normpath("/" + path))
        try:
            text = local.read_text(errors="replace")
        except OSError as exc:
            error = f"{path}: {os.strerror(exc.errno or 0)}"
            return h.send_json(200, {"status": "ERROR", "file": None, "is_binary": False, "error": error})
        return h.send_json(200, {"status": "OK", "file": text, "is_binary": False, "error": None})

    def _submit(self, h: _Handler, form: dict[str, list[str]]) -> None:
        with self._lock:
            injected = self._submit_errors.pop(0) if self._submit_errors else None
        try:
            if injected:
                raise FakeSfapiError(injected)
            job = self._new_job(form) if self.slurm is None else self._sbatch(form)
        except (FakeSfapiError, OSError, ValueError) as exc:
            result = {"status": "error", "jobid": None, "error": f"sbatch: error: {exc}"}
        else:
            result = {"status": "ok", "jobid": job.jobid, "error": None}
            log.info(
                "fake SFAPI: job %s submitted (%d node(s), %d srun step(s))",
                job.jobid,
                job.nodes,
                len(job.steps),
            )
        return h.send_json(200, {"task_id": self._task(result), "status": "OK", "error": None})

    def _new_job(self, form: dict[str, list[str]]) -> FakeJob:
        script = (form.get("job") or [""])[0]
        if (form.get("isPath") or ["false"])[0].lower() == "true":
            script = self._local(script).read_text()
        job = self._parse_job(str(next(self._ids)), script)
        with self._lock:
            self.jobs[job.jobid] = job
        return job

    def _query(self, h: _Handler, query: dict[str, list[str]]) -> None:
        """squeue (live jobs) or sacct (all jobs); each query of a job advances PENDING towards RUNNING."""
        with self._lock:
            error = self._query_errors.pop(0) if self._query_errors else None
        if error:
            return h.send_json(200, {"status": "ERROR", "output": None, "error": error})
        sacct = (query.get("sacct") or ["false"])[0].lower() == "true"
        kwargs = dict(kv.split("=", 1) for kv in query.get("kwargs", []) if "=" in kv)
        ids = kwargs["jobid"].split(",") if "jobid" in kwargs else list(self.jobs)
        if self.slurm is not None:
            try:
                rows = self._sacct_rows(ids) if sacct else self._squeue_rows(ids)
            except _SlurmCommandError as exc:  # slurmctld busy or down: what SFAPI passes on
                return h.send_json(200, {"status": "ERROR", "output": None, "error": str(exc)})
            return h.send_json(200, {"status": "OK", "output": rows, "error": None})
        rows = []
        for jobid in ids:
            job = self.jobs.get(jobid)
            if job is None:
                continue
            self._advance(job)
            if not sacct and job.state not in QUEUED_STATES:
                continue  # finished jobs leave squeue; the client then asks sacct
            rows.append(
                {
                    "jobid": jobid,
                    "state": job.state,
                    "name": job.directives.get("job_name", "fake"),
                    "qos": job.qos,
                    "account": job.directives.get("account"),
                    "user": "fake",
                    "nodes": str(job.nodes),
                    "reason": "Priority" if job.state == "PENDING" else "None",
                }
            )
        return h.send_json(200, {"status": "OK", "output": rows, "error": None})

    def _cancel(self, h: _Handler, jobid: str) -> None:
        if self.slurm is not None:
            proc = self.slurm.run(["scancel", jobid], check=False, env=self._login_env())
            if proc.returncode != 0:
                error = (proc.stderr or proc.stdout).strip()
                return h.send_json(200, {"status": "ERROR", "output": None, "error": error})
            return h.send_json(200, {"status": "OK", "output": [], "error": None})
        job = self.jobs.get(jobid)
        if job is None:
            error = f"scancel: error: Kill job error on job id {jobid}: Invalid job id specified"
            return h.send_json(200, {"status": "ERROR", "output": None, "error": error})
        with self._lock:
            if job.state in TERMINAL_STATES:
                error = f"scancel: error: Kill job error on job id {jobid}: Job/step already completing or completed"
                return h.send_json(200, {"status": "ERROR", "output": None, "error": error})
            job.state = "CANCELLED"
            job.pinned = True
            job.ended_at = time.monotonic()
        self._stop_job(job)
        return h.send_json(200, {"status": "OK", "output": [], "error": None})

    # ---- jobs on a real Slurm -----------------------------------------------------------------------
    def _login_env(self) -> dict[str, str]:
        """The environment sbatch runs in: a login shell's (as SFAPI's), never this process's, plus env."""
        user = os.environ.get("USER") or getpass.getuser()
        base = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
        }
        return {**base, **self.env}

    def _sbatch(self, form: dict[str, list[str]]) -> FakeJob:
        """Submit the script to the real Slurm; sbatch's own refusal becomes the task's error."""
        assert self.slurm is not None
        script = (form.get("job") or [""])[0]
        if (form.get("isPath") or ["false"])[0].lower() == "true":
            script = self._local(script).read_text()
        directives = parse_sbatch(script)
        output = directives.get("output", "slurm-%j.out")
        mapped = self._local(posixpath.normpath(output)) if output.startswith("/") else self.root / output
        proc = self.slurm.run(
            ["sbatch", "--parsable", f"--output={mapped}"],
            input=script,
            check=False,
            cwd=self.root,
            env=self._login_env(),
        )
        if proc.returncode != 0:
            raise FakeSfapiError((proc.stderr or proc.stdout).strip().removeprefix("sbatch: error: "))
        jobid = proc.stdout.strip().split(";")[0]
        name = directives.get("job_name", "")
        try:
            steps = [
                parse_srun(line, _int_range_min(directives.get("nodes", "1"))) for line in srun_lines(script)
            ]
        except (FakeSfapiError, ValueError):
            steps = []  # Slurm is the judge of the script here; the parsed steps are only for assertions
        job = FakeJob(
            jobid=jobid,
            script=script,
            directives=directives,
            env=parse_exports(script),
            steps=steps,
            nodes=_int_range_min(directives.get("nodes", "1")),
            walltime=parse_walltime(directives["time"]) if "time" in directives else None,
            output=Path(str(mapped).replace("%x", name or "sbatch").replace("%j", jobid)),
            state="SLURM",
            slurm=True,
        )
        with self._lock:
            self.jobs[jobid] = job
        return job

    def _squeue_rows(self, ids: list[str]) -> list[dict[str, str]]:
        """squeue -j (live jobs only, as SFAPI's squeue); an unknown id is no row, not an error."""
        assert self.slurm is not None
        fmt = "|".join(f for f, _ in _SQUEUE_FIELDS)
        argv = ["squeue", "--noheader", "-o", fmt] + (["-j", ",".join(ids)] if ids else [])
        proc = self.slurm.run(argv, check=False, env=self._login_env())
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return []
            raise _SlurmCommandError(proc.stderr.strip() or f"squeue exited {proc.returncode}")
        names = [name for _, name in _SQUEUE_FIELDS]
        return [dict(zip(names, line.split("|"))) for line in proc.stdout.splitlines() if line.strip()]

    def _sacct_rows(self, ids: list[str]) -> list[dict[str, str]]:
        """What sacct would say, without an accounting daemon: scontrol while Slurm keeps the job, then the
        job-completion file."""
        rows = [self._slurm_row(jobid) for jobid in ids]
        return [row for row in rows if row]

    def _slurm_row(self, jobid: str) -> dict[str, str]:
        """One job in sacct's field names, from scontrol or the job-completion file; {} if Slurm never knew it."""
        assert self.slurm is not None
        info = self.slurm.job(jobid) or self.slurm.completed_job(jobid)
        if not info:
            return {}
        return {sacct: info[key] for key, sacct in _SACCT_FIELDS if key in info} | {"jobid": jobid}

    def _close_slurm_jobs(self, ids: list[str]) -> None:
        """Cancel every job this fake submitted (already-ended ones are a no-op for scancel) and wait until
        their processes are gone."""
        assert self.slurm is not None
        if not ids:
            return
        with contextlib.suppress(Exception):
            self.slurm.run(["scancel", *ids], check=False, env=self._login_env())
        deadline = time.monotonic() + self.slurm.kill_wait + 10
        while time.monotonic() < deadline and any(self.slurm.job_processes(j) for j in ids):
            time.sleep(0.1)

    # ---- jobs in process --------------------------------------------------------------------------
    def _local(self, remote: str) -> Path:
        """Where a "remote" Perlmutter path lives under root."""
        return self.root / remote.lstrip("/")

    def _parse_job(self, jobid: str, script: str) -> FakeJob:
        if not script.startswith("#!"):
            raise FakeSfapiError("This does not look like a batch script. The first line must start with #!")
        directives = parse_sbatch(script)
        nodes = _int_range_min(directives.get("nodes", "1"))
        job_name = directives.get("job_name", "fake")
        output = directives.get("output", "slurm-%j.out").replace("%x", job_name).replace("%j", jobid)
        return FakeJob(
            jobid=jobid,
            script=script,
            directives=directives,
            env=parse_exports(script),
            steps=[parse_srun(line, nodes) for line in srun_lines(script)],
            nodes=nodes,
            walltime=parse_walltime(directives["time"]) if "time" in directives else None,
            output=self._local(posixpath.normpath(output)),
        )

    def _advance(self, job: FakeJob) -> None:
        """PENDING for pending_polls queries, then RUNNING (starting the tasks)."""
        with self._lock:
            if job.pinned or job.state != "PENDING" or self.stuck_pending or self._closed:
                return
            job.polls += 1
            if job.polls <= self.pending_polls:
                return
            job.state = "RUNNING"
            job.started_at = time.monotonic()
            job.monitor = threading.Thread(
                target=self._run_job, args=(job,), name=f"fake-job-{job.jobid}", daemon=True
            )
        job.monitor.start()

    def _run_job(self, job: FakeJob) -> None:
        """Run the job's steps, then settle its final state and make sure nothing of it outlives it."""
        deadline = None if job.walltime is None else time.monotonic() + job.walltime
        job.output.parent.mkdir(parents=True, exist_ok=True)
        with open(job.output, "ab") as out:
            final = self._run_steps(job, out, deadline) if job.steps else self._hold(job, deadline)
        with self._lock:
            ending = job.state == "RUNNING" and not job.pinned
            if ending:
                job.state = "COMPLETING"  # as in Slurm: the final state shows once every process is gone
        self._stop_job(job)  # leftover tasks (kill-on-bad-exit, walltime) and any children they left
        with self._lock:
            if ending and job.state == "COMPLETING" and not job.pinned:
                job.state = final
                job.ended_at = time.monotonic()
        log.info("fake SFAPI: job %s ended %s, exit codes %s", job.jobid, job.state, job.exit_codes)

    def _run_steps(self, job: FakeJob, out: IO[bytes], deadline: float | None) -> str:
        """srun lines one after another (background ones overlap); the first failure ends the job."""
        background: list[subprocess.Popen[bytes]] = []
        for step in job.steps:
            procs = self._start_step(job, step, out)
            if procs is None:
                return "CANCELLED"
            if step.background:
                background += procs
                continue
            outcome = self._wait_procs(job, procs, deadline, step.kill_on_bad_exit)
            if outcome != "COMPLETED":
                return outcome
        return self._wait_procs(job, background, deadline, False)

    @staticmethod
    def _hold(job: FakeJob, deadline: float | None) -> str:
        """A job without srun lines holds its nodes until cancelled or out of walltime."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        return "CANCELLED" if job.stop.wait(timeout) else "TIMEOUT"

    def _start_step(
        self, job: FakeJob, step: SrunStep, out: IO[bytes]
    ) -> list[subprocess.Popen[bytes]] | None:
        procs = []
        with job.lock:
            if job.stop.is_set():
                return None
            for task in range(step.ntasks):
                env = {**os.environ, **self.env, **job.env, **_slurm_env(job, step, task)}
                proc = subprocess.Popen(
                    step.argv,
                    env=env,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: a signal reaches the task's children too
                )
                job.processes.append(proc)
                job.task_ids.append(task)
                procs.append(proc)
        return procs

    def _wait_procs(
        self,
        job: FakeJob,
        procs: list[subprocess.Popen[bytes]],
        deadline: float | None,
        kill_on_bad_exit: bool,
    ) -> str:
        """Wait for these processes; the outcome is COMPLETED, FAILED, TIMEOUT or CANCELLED."""
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes) and (kill_on_bad_exit or None not in codes):
                return "FAILED"
            if None not in codes:
                return "COMPLETED"
            if deadline is not None and time.monotonic() >= deadline:
                return "TIMEOUT"
            if job.stop.wait(0.02):
                return "CANCELLED"

    def _stop_job(self, job: FakeJob) -> None:
        """SIGTERM every process group of the job, SIGKILL what is left after kill_grace; idempotent."""
        job.stop.set()
        with job.lock:
            procs = list(job.processes)
            _signal_groups(procs, signal.SIGTERM)
            deadline = time.monotonic() + self.kill_grace
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.01)
            _signal_groups(procs, signal.SIGKILL)  # also reaches children whose leader already exited
            for p in procs:
                p.wait()


def _signal_groups(procs: list[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    """Send a signal to each process's group (each task was started in its own session)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group is gone already
            os.killpg(p.pid, sig)


def _slurm_env(job: FakeJob, step: SrunStep, task: int) -> dict[str, str]:
    """The per-task variables srun sets (block distribution of tasks over nodes)."""
    per_node = -(-step.ntasks // step.nodes)
    node = task // per_node
    return {
        "SLURM_JOB_ID": job.jobid,
        "SLURM_JOBID": job.jobid,
        "SLURM_JOB_NAME": job.directives.get("job_name", "fake"),
        "SLURM_JOB_NUM_NODES": str(job.nodes),
        "SLURM_NNODES": str(step.nodes),
        "SLURM_NTASKS": str(step.ntasks),
        "SLURM_PROCID": str(task),
        "SLURM_NODEID": str(node),
        "SLURM_LOCALID": str(task - node * per_node),
        "SLURMD_NODENAME": f"nid{node + 1:06d}",
        "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",  # every fake node is this machine
    }


# ---- script parsing (public: the tests of tasks/nersc/batch.py check rendered scripts with it too) ----------
def parse_sbatch(script: str) -> dict[str, str]:
    """#SBATCH options by canonical name (nodes, qos, account, constraint, time, job_name, output, ...)."""
    out: dict[str, str] = {}
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.startswith("#"):
                break  # sbatch stops reading directives at the first command
            continue
        words = shlex.split(line[len("#SBATCH") :], comments=True)
        i = 0
        while i < len(words):
            word = words[i]
            name, eq, value = word.partition("=")
            if not eq and word.startswith("-") and not word.startswith("--") and len(word) > 2:
                name, value, eq = word[:2], word[2:], "="  # -N4
            if not eq and name not in _SBATCH_FLAGS and i + 1 < len(words):
                value = words[i + 1]
                i += 1
            out[_SBATCH_ALIASES.get(name, name)] = value if name not in _SBATCH_FLAGS else "1"
            i += 1
    return out


def parse_exports(script: str) -> dict[str, str]:
    """Variables from ``export NAME=value`` lines (values unquoted, not expanded)."""
    env: dict[str, str] = {}
    for line in script.splitlines():
        words = shlex.split(line, comments=True) if line.lstrip().startswith("export ") else []
        for word in words[1:]:
            name, eq, value = word.partition("=")
            if eq:
                env[name] = value
    return env


def srun_lines(script: str) -> list[str]:
    """The script's srun command lines, in order."""
    return [line for line in script.splitlines() if re.match(r"^\s*(exec\s+)?srun\s", line)]


def parse_srun(line: str, job_nodes: int) -> SrunStep:
    """One srun line: its node/task counts and the command each task runs."""
    words = shlex.split(line, comments=True)
    background = words[-1] == "&"
    words = words[:-1] if background else words
    i = words.index("srun") + 1
    opts: dict[str, str] = {}
    while i < len(words) and words[i].startswith("-"):
        name, eq, value = words[i].partition("=")
        if not eq and not name.startswith("--") and len(name) > 2:
            name, value, eq = name[:2], name[2:], "="
        if not eq and name in _SRUN_VALUED:
            i += 1
            value = words[i] if i < len(words) else ""
        opts[name] = value
        i += 1
    argv = words[i:]
    if not argv:
        raise FakeSfapiError(f"srun line without a command: {line!r}")
    nodes = _int_range_min(opts.get("-N") or opts.get("--nodes") or str(job_nodes))
    per_node = int(opts.get("--ntasks-per-node") or 0)
    ntasks = int(opts.get("-n") or opts.get("--ntasks") or 0) or nodes * (per_node or 1)
    kill = opts.get("-K", opts.get("--kill-on-bad-exit", "0")) in ("", "1")
    return SrunStep(argv=argv, nodes=nodes, ntasks=ntasks, kill_on_bad_exit=kill, background=background)


def parse_walltime(text: str) -> float:
    """Slurm time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS -> seconds."""
    days, _, rest = text.rpartition("-")
    fields = [int(f) for f in rest.split(":")]
    if days:
        fields += [0] * (3 - len(fields))
        h, m, s = fields
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(fields) == 1:
        return fields[0] * 60.0
    if len(fields) == 2:
        return fields[0] * 60.0 + fields[1]
    h, m, s = fields
    return (h * 60 + m) * 60.0 + s


def _int_range_min(text: str) -> int:
    """Slurm node counts can be ranges ("2-4"): the fake takes the minimum."""
    return int(text.split("-")[0])


# ---- private_key_jwt ------------------------------------------------------------------------------
def _b64url(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _check_assertion(
    form: dict[str, list[str]], assertion: str, token_url: str, keys: dict[str, Any]
) -> str | None:
    """Why a token request fails (None when it is good): grant, assertion type, claims, signature."""
    if form.get("grant_type") != ["client_credentials"]:
        return "grant_type must be client_credentials"
    if (form.get("client_assertion_type") or [""])[0] != JWT_BEARER or not assertion:
        return "a private_key_jwt client_assertion is required"
    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(_b64url(header_b64))
        claims = json.loads(_b64url(payload_b64))
    except ValueError:
        return "client_assertion is not a JWT"
    client_id = claims.get("iss")
    if not client_id or claims.get("sub") != client_id:
        return "iss and sub must both be the client id"
    if claims.get("aud") not in (token_url, [token_url]):
        return "aud must be the token endpoint"
    if float(claims.get("exp", 0)) < time.time():
        return "client_assertion has expired"
    if keys:
        key = keys.get(client_id)
        if key is None:
            return "unknown client"
        if not _verify_signature(
            key, header.get("alg"), f"{header_b64}.{payload_b64}".encode(), _b64url(signature_b64)
        ):
            return "client_assertion signature does not verify"
    return None


def _public_key(key: str | bytes | dict[str, Any]) -> Any:
    """A registered client key (PEM private/public key or JWK dict) as a cryptography public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(key, dict):
        n, e = (int.from_bytes(_b64url(key[k]), "big") for k in ("n", "e"))
        return rsa.RSAPublicNumbers(e, n).public_key()
    data = key.encode() if isinstance(key, str) else key
    if b"PRIVATE KEY" in data:
        return serialization.load_pem_private_key(data, password=None).public_key()
    return serialization.load_pem_public_key(data)


def _verify_signature(public_key: Any, alg: str | None, signed: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    if alg != "RS256":
        return False
    try:
        public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


# ---- HTTP handler -------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = (
        True  # headers and body go out in two writes: Nagle + delayed ACK cost 40 ms each
    )
    fake: FakeSfapi

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake SFAPI: " + format, *args)

    def read_body(self) -> bytes:
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def send_json(self, code: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout is shorter than an injected delay)

    def do_GET(self) -> None:
        self.fake._handle(self, "GET")

    def do_POST(self) -> None:
        self.fake._handle(self, "POST")

    def do_PUT(self) -> None:
        self.fake._handle(self, "PUT")

    def do_DELETE(self) -> None:
        self.fake._handle(self, "DELETE")


def _handler_class(fake: FakeSfapi) -> type[_Handler]:
    """A handler class bound to one fake (http.server instantiates handlers itself)."""
    return type("FakeSfapiHandler", (_Handler,), {"fake": fake})


# ---- CLI ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Serve a fake SFAPI until interrupted; prints the base URL first, then the token URL and a token."""
    parser = argparse.ArgumentParser(
        prog="python -m stemstream_testing.fake_sfapi", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--root", required=True, type=Path, help="directory standing in for Perlmutter's file systems"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--pending-polls", type=int, default=1, help="in-process jobs only")
    parser.add_argument(
        "--slurm",
        type=Path,
        metavar="DIR",
        help="run the jobs on a loopback Slurm cluster kept in DIR (started now, stopped on exit)",
    )
    parser.add_argument("--nodes", type=int, default=2, help="nodes of that Slurm cluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    args.root.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        cluster = None
        if args.slurm is not None:
            from stemstream_testing.slurm_cluster import SlurmCluster

            cluster = stack.enter_context(SlurmCluster(args.slurm.resolve(), nodes=args.nodes))
        fake = stack.enter_context(
            FakeSfapi(
                args.root.resolve(),
                host=args.host,
                port=args.port,
                pending_polls=args.pending_polls,
                slurm=cluster,
            )
        )
        print(fake.base_url, flush=True)
        print(f"token_url {fake.token_url}", file=sys.stderr, flush=True)
        print(f"access_token {fake.issue_token()}", file=sys.stderr, flush=True)
        if cluster is not None:
            print(
                f"export SLURM_CONF={cluster.conf}   # squeue, scontrol, scancel", file=sys.stderr, flush=True
            )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
