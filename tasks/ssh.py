"""Run commands on the aggregator host over SSH (paramiko), with pinned host keys and bounded waits.

* Host keys come only from ``known_hosts`` in the settings: an unknown host or a changed key is refused
  (``RejectPolicy``), never added. Pin a host once with ``ssh-keyscan -p PORT HOST >> known_hosts`` and
  check the fingerprint by hand.
* ``run_remote`` drains stdout and stderr together until the channel's EOF, so a chatty command can't
  block on a full window and no tail of either stream is lost (the exit status can arrive before it).
* ``start_remote_process`` starts a long-lived process (the aggregator, its live page) detached in its own
  session (``nohup setsid``) and returns its PID; ``stop_remote_process`` ends its whole process group;
  ``wait_remote_line`` waits for a line in its log (the page's ``live:``). A secret it needs (a file)
  travels on the command's stdin, never in a command line, which other users of the host can read.
* Errors are typed (``RemoteError`` subclasses) and never contain the key or its passphrase. Socket and
  paramiko errors never escape raw: a broken connection is ``RemoteUnreachable`` and a slow command
  ``RemoteTimeout`` (both transient, so retried), a key problem or a failed command is permanent.
"""

from __future__ import annotations

import base64
import getpass
import logging
import posixpath
import select
import shlex
import time
from dataclasses import dataclass
from typing import Literal

import paramiko

from counting.errors import PermanentError, StemstreamError, TransientError
from tasks.settings import SshSettings

log = logging.getLogger(__name__)

_STDERR_TAIL = 2000  # characters of stderr kept in RemoteCommandFailed
_START_FAILED = 97  # exit status of the start wrapper when the process died at once


class RemoteError(StemstreamError, RuntimeError):
    """Base of every SSH failure (never raised itself); messages never contain keys or passphrases."""


class HostKeyRejected(PermanentError, RemoteError):
    """The host is not in known_hosts, or its key differs from the pinned one."""


class AuthenticationFailed(PermanentError, RemoteError):
    """The user key was refused, or could not be loaded (missing file, wrong passphrase)."""


class RemoteUnreachable(TransientError, RemoteError):
    """No SSH session could be set up: DNS, refused or timed-out connection, no SSH banner."""


class RemoteTimeout(TransientError, RemoteError):
    """The command did not finish within its timeout (it may still be running on the host)."""


class RemoteCommandFailed(PermanentError, RemoteError):
    """The command exited non-zero."""

    def __init__(self, command: str, exit_status: int, stderr_tail: str) -> None:
        super().__init__(f"{_short(command)} exited {exit_status}: {stderr_tail.strip() or '(no stderr)'}")
        self.command = command
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


class ForeignProcess(PermanentError, RemoteError):
    """The PID to stop is no longer the process we started (it exited and the PID was reused)."""


# In a started process's environment (as local processes carry theirs): how a stop knows the PID is ours.
TOKEN_VARIABLE = "STEMSTREAM_PROCESS_GROUP"


@dataclass(frozen=True)
class RemoteResult:
    """What a remote command returned."""

    exit_status: int
    stdout: str
    stderr: str


class _PinnedHostKeys(paramiko.RejectPolicy):
    """RejectPolicy with a clear typed error naming the host and the offered key's fingerprint."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyRejected(
            f"host key of {hostname} ({key.get_name()} {key.fingerprint}) is not in known_hosts; "
            "pin it with ssh-keyscan and check the fingerprint by hand"
        )


def run_remote(
    settings: SshSettings,
    command: list[str] | str,
    timeout: float | None = None,
    *,
    check: bool = True,
    stdin: str | None = None,
) -> RemoteResult:
    """Run a command on the host and return its exit status and output; RemoteCommandFailed if non-zero.
    stdin: sent to the command, then EOF (how a secret travels: never in a command line or a log)."""
    text = command if isinstance(command, str) else shlex.join(command)
    timeout = settings.command_timeout if timeout is None else timeout
    with _connect(settings) as client:
        result = _exec(client, settings, text, timeout, stdin)
    log.debug("ssh %s: %s -> exit %d", settings.host, _short(text), result.exit_status)
    if check and result.exit_status != 0:
        raise RemoteCommandFailed(text, result.exit_status, result.stderr[-_STDERR_TAIL:])
    return result


def start_remote_process(
    settings: SshSettings,
    command: list[str] | str,
    log_path: str,
    *,
    settle: float = 0.2,
    files: dict[str, str] | None = None,
    token: str | None = None,
    secret_file: tuple[str, str] | None = None,
) -> int:
    """Start a detached process on the host (output appended to log_path) and return its PID.

    files: {remote path: text} written first (e.g. the session's settings file for the aggregator); they
    travel inside the same command, base64-encoded, so no second channel or file transfer is needed.
    The process gets its own session, so ``stop_remote_process`` can end it with all its children. If it
    is gone after ``settle`` seconds, RemoteCommandFailed carries the end of its log. token: put in its
    environment, for ``stop_remote_process`` to check that the PID is still this process. secret_file:
    (remote path, text) written mode 0600 from the command's stdin, so the text is in no command line
    (which other users of the host can read) and no log.
    """
    text = command if isinstance(command, str) else shlex.join(command)
    if token is not None:
        text = f"env {TOKEN_VARIABLE}={shlex.quote(token)} {text}"
    log_q = shlex.quote(log_path)
    writes = []
    for path, content in (files or {}).items():
        encoded = base64.b64encode(content.encode()).decode()
        q = shlex.quote(path)
        writes += [
            f"mkdir -p {shlex.quote(posixpath.dirname(path) or '.')} || exit {_START_FAILED}",
            f"echo {encoded} | base64 -d > {q} || exit {_START_FAILED}",
        ]
    if secret_file is not None:
        q = shlex.quote(secret_file[0])
        d = shlex.quote(posixpath.dirname(secret_file[0]) or ".")
        writes.append(f"(umask 077; mkdir -p {d} && rm -f {q} && cat > {q}) || exit {_START_FAILED}")
    # The inner subshell exits at once, so the process is re-parented and the SSH channel is not held open.
    script = [
        _ALIVE,
        *writes,
        f"mkdir -p {shlex.quote(posixpath.dirname(log_path) or '.')} || exit {_START_FAILED}",
        f"pid=$(nohup setsid {text} >>{log_q} 2>&1 </dev/null & echo $!)",
        f"sleep {settle:.3f}",
        'if alive "$pid"; then echo "$pid"; exit 0; fi',
        f"tail -c {_STDERR_TAIL} {log_q} >&2",
        f"exit {_START_FAILED}",
    ]
    secret = secret_file[1] if secret_file is not None else None
    result = run_remote(settings, _sh(script), check=False, stdin=secret)
    if result.exit_status != 0:
        raise RemoteCommandFailed(text, result.exit_status, result.stderr[-_STDERR_TAIL:])
    pid = int(result.stdout.split()[-1])
    log.info("started %s on %s as PID %d (log %s)", _short(text), settings.host, pid, log_path)
    return pid


def stop_remote_process(
    settings: SshSettings, pid: int, *, grace: float = 5.0, token: str | None = None
) -> Literal["not-running", "terminated", "killed"]:
    """End a process started by start_remote_process (SIGTERM to its group, SIGKILL after grace). With the
    token it was started with, a PID whose /proc/PID/environ does not carry it is refused (ForeignProcess):
    the PID may have been reused by an unrelated process since."""
    if pid < 2:
        raise ValueError(f"refusing to signal PID {pid}")  # kill -TERM -1 would hit every process of the user
    steps = max(1, int(grace / 0.1))
    needle = shlex.quote(f"{TOKEN_VARIABLE}={token}")
    ours = [
        f"tr '\\0' '\\n' </proc/$pid/environ 2>/dev/null | grep -qxF -- {needle} || {{ echo foreign; exit 0; }}"
    ]
    # "kill -TERM -PID" signals the process group; dash's kill does not take "--".
    script = [
        _ALIVE,
        f"pid={pid}",
        'alive "$pid" || { echo not-running; exit 0; }',
        *(ours if token is not None else []),
        'kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null',
        f'i=0; while alive "$pid" && [ "$i" -lt {steps} ]; do sleep 0.1; i=$((i+1)); done',
        'alive "$pid" || { kill -KILL "-$pid" 2>/dev/null; echo terminated; exit 0; }',
        'kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null',
        # SIGKILL is delivered asynchronously: report "killed" once the process is really gone (or 2 s).
        'i=0; while alive "$pid" && [ "$i" -lt 20 ]; do sleep 0.1; i=$((i+1)); done',
        "echo killed",
    ]
    result = run_remote(settings, _sh(script), timeout=grace + settings.command_timeout)
    outcome = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if outcome == "foreign":
        raise ForeignProcess(
            f"refusing to stop PID {pid} on {settings.host}: it does not carry this session's token "
            "(it is no longer the process this session started)"
        )
    if outcome not in ("not-running", "terminated", "killed"):
        raise RemoteCommandFailed(f"stop PID {pid}", result.exit_status, result.stderr or result.stdout)
    log.info("PID %d on %s: %s", pid, settings.host, outcome)
    return outcome  # type: ignore[return-value]


def remote_exit_tail(settings: SshSettings, pid: int, log_path: str) -> str | None:
    """None while a process started by start_remote_process runs; once it has exited, the end of its log."""
    script = [
        _ALIVE,
        f"alive {pid} && {{ echo running; exit 0; }}",
        f"tail -c {_STDERR_TAIL} {shlex.quote(log_path)}",
    ]
    result = run_remote(settings, _sh(script), check=False)
    if result.exit_status != 0:
        raise RemoteCommandFailed(f"look at PID {pid}", result.exit_status, result.stderr)
    return None if result.stdout.strip() == "running" else result.stdout


def wait_remote_line(
    settings: SshSettings, pid: int, log_path: str, prefix: str, timeout: float, *, then_read: str = ""
) -> tuple[str, str]:
    """Wait until the log of a process started by start_remote_process has a line starting with prefix;
    return that line's rest and the first line of the file then_read ("" when there is none). The second
    comes back on stdout only (never in a log or an error: it may be a secret). RemoteCommandFailed with
    the log's end if the process exits first or timeout passes."""
    log_q, steps = shlex.quote(log_path), max(1, int(timeout / 0.1))
    grep = f"grep -m1 -e {shlex.quote('^' + prefix)} {log_q} 2>/dev/null"
    script = [
        _ALIVE,
        f"i=0; while ! {grep} >/dev/null; do "
        f'alive {pid} || {{ echo "PID {pid} exited" >&2; tail -c {_STDERR_TAIL} {log_q} >&2; exit 3; }}; '
        f'[ "$i" -ge {steps} ] && {{ echo "no {prefix.strip()} line after {timeout:g} s" >&2; '
        f"tail -c {_STDERR_TAIL} {log_q} >&2; exit 4; }}; sleep 0.1; i=$((i+1)); done",
        grep,
        *([f"head -n1 {shlex.quote(then_read)} 2>/dev/null"] if then_read else []),
        "exit 0",
    ]
    result = run_remote(settings, _sh(script), timeout=timeout + settings.connect_timeout, check=False)
    if result.exit_status != 0:
        raise RemoteCommandFailed(f"wait for {prefix!r} in {log_path}", result.exit_status, result.stderr)
    lines = result.stdout.splitlines()
    return lines[0].removeprefix(prefix).strip(), (lines[1].strip() if len(lines) > 1 else "")


# A zombie still answers kill -0, so look at its state too (where there is a /proc).
_ALIVE = (
    'alive() { kill -0 "$1" 2>/dev/null || return 1; '
    "[ -r /proc/$1/stat ] || return 0; "
    "[ \"$(sed 's/.*) //' /proc/$1/stat | cut -c1)\" != Z ]; }"
)


def _sh(lines: list[str]) -> list[str]:
    """Run these lines with sh whatever the login shell is; one line, as csh can't quote newlines."""
    return ["sh", "-c", "; ".join(lines)]


def _short(command: str, limit: int = 200) -> str:
    """The command for messages, cut to a readable length."""
    return repr(command if len(command) <= limit else command[: limit - 3] + "...")


def _load_key(settings: SshSettings) -> paramiko.PKey:
    """The user's private key, with a message that names the file but never the passphrase."""
    passphrase = settings.key_passphrase.get_secret_value() if settings.key_passphrase else None
    try:
        # bytes: cryptography refuses a str password with a TypeError that would read as a wrong passphrase
        return paramiko.PKey.from_path(
            settings.key_path, password=passphrase.encode() if passphrase is not None else None
        )
    except OSError as exc:
        raise AuthenticationFailed(f"cannot read SSH key {settings.key_path}: {exc.strerror}") from None
    except Exception as exc:  # cryptography and paramiko raise ValueError, TypeError or SSHException here
        if passphrase is None and isinstance(exc, TypeError | paramiko.PasswordRequiredException):
            reason = "it is encrypted: set key_passphrase"
        elif passphrase is not None:
            reason = "wrong passphrase, or not a usable private key"
        else:
            reason = f"not a usable private key ({type(exc).__name__})"
        raise AuthenticationFailed(f"cannot load SSH key {settings.key_path}: {reason}") from None


def _connect(settings: SshSettings) -> paramiko.SSHClient:
    """An authenticated client; the host key must match known_hosts."""
    if not settings.known_hosts.is_file():
        raise HostKeyRejected(
            f"known_hosts file {settings.known_hosts} does not exist: no host key is pinned"
        )
    pkey = _load_key(settings)
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(str(settings.known_hosts))  # only these; never the system or user files
    except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as exc:
        raise HostKeyRejected(
            f"cannot read known_hosts file {settings.known_hosts}: {type(exc).__name__}: {exc}"
        ) from None
    client.set_missing_host_key_policy(_PinnedHostKeys())
    where = f"{settings.host}:{settings.port}"
    user = settings.user or getpass.getuser()
    t = settings.connect_timeout
    try:
        client.connect(
            settings.host,
            port=settings.port,
            username=user,
            pkey=pkey,
            look_for_keys=False,
            allow_agent=False,
            timeout=t,
            banner_timeout=t,
            auth_timeout=t,
            channel_timeout=t,
        )
    except HostKeyRejected:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyRejected(
            f"host key of {where} CHANGED: offered {exc.key.get_name()} {exc.key.fingerprint}, "
            f"pinned {exc.expected_key.fingerprint}; possible man-in-the-middle, refusing to connect"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise AuthenticationFailed(f"{user}@{where} refused the key {settings.key_path}") from None
    except (OSError, paramiko.SSHException, EOFError) as exc:  # socket errors, timeouts, no SSH banner
        client.close()
        raise RemoteUnreachable(
            f"cannot open an SSH session to {where}: {type(exc).__name__}: {exc}"
        ) from None
    return client


def _exec(
    client: paramiko.SSHClient, settings: SshSettings, command: str, timeout: float, stdin: str | None = None
) -> RemoteResult:
    """Run one command on an open client (stdin sent, then EOF), draining both streams until EOF."""
    transport = client.get_transport()
    if transport is None:
        raise RemoteUnreachable(f"SSH session to {settings.host} closed before the command")
    try:
        chan = transport.open_session(timeout=settings.connect_timeout)
        chan.settimeout(timeout)
        chan.exec_command(command)
        if stdin:
            chan.sendall(stdin.encode())
        chan.shutdown_write()  # then EOF: a command that reads stdin never hangs on it
    except (paramiko.SSHException, OSError) as exc:
        raise RemoteUnreachable(f"cannot run a command over SSH on {settings.host}: {exc}") from None
    with chan:
        try:
            return _drain(chan, settings, command, timeout)
        except (paramiko.SSHException, OSError) as exc:  # the session broke under a running command
            raise RemoteUnreachable(
                f"SSH session to {settings.host} lost during {_short(command)}: {type(exc).__name__}: {exc}"
            ) from None


def _drain(chan: paramiko.Channel, settings: SshSettings, command: str, timeout: float) -> RemoteResult:
    """Read both streams of a running command until EOF and its exit status, within timeout."""
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if chan.recv_ready():
            out += chan.recv(65536)
        if chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        # Stop only at EOF with nothing buffered: the exit status can come before the last stderr bytes.
        if (
            chan.eof_received
            and chan.exit_status_ready()
            and not chan.recv_ready()
            and not chan.recv_stderr_ready()
        ):
            break
        if not chan.get_transport().is_active():  # the connection died before the command's EOF
            raise RemoteUnreachable(f"SSH session to {settings.host} lost during {_short(command)}")
        if time.monotonic() > deadline:
            raise RemoteTimeout(f"{_short(command)} on {settings.host} exceeded {timeout:g} s")
        try:
            select.select([chan], [], [], 0.1)
        except (OSError, ValueError):
            time.sleep(0.01)  # the channel closed under us; the flags above end the loop
    status = chan.recv_exit_status()
    return RemoteResult(status, out.decode(errors="replace"), err.decode(errors="replace"))
