"""The live page beside a remote aggregator (NERSC backend): `stemstream view` started over SSH on the
aggregator host as the aggregator is (its settings file, its process token, a detached process group), its
``live:`` address and its token read back over SSH, and stopped with the aggregator.

The token never travels in a command line or a log: a configured live.token goes to the host on the SSH
command's stdin (a 0600 file there), and the page's token comes back on stdout into the session's own 0600
token file, for the user's terminal (tasks.acquisition.live).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from streaming.view.token import TOKEN_FILE, write_token
from tasks.launch.plan import SessionPlan, view_command
from tasks.settings import SshSettings
from tasks.ssh import RemoteError, start_remote_process, stop_remote_process, wait_remote_line

log = logging.getLogger(__name__)

REMOTE_TOKEN_FILE = f"{TOKEN_FILE}-remote"  # on the aggregator host, beside the session's own token file
PAGE_WAIT = 30.0  # seconds the page may take to answer (bounded: arming the aggregator has 120 s in all)


@dataclass(frozen=True)
class RemotePage:
    """A live page started on the aggregator host."""

    pid: int  # its process group there
    url: str  # the page's address, without its token (logs and links may show it)
    token: str = field(default="", repr=False)  # "" when the page asks for none


def view_log(plan: SessionPlan, attempt: int) -> str:
    """The remote page's log: logs/view-remote.log (a retried arm: view-remote-2.log, ... so that an
    earlier page's ``live:`` line is never taken for the new one's)."""
    name = "view-remote.log" if attempt <= 1 else f"view-remote-{attempt}.log"
    return str(plan.session_dir / "logs" / name)


def start_remote_view(
    ssh: SshSettings,
    plan: SessionPlan,
    settings_file: str,
    remote_command: list[str] | None,
    process_token: str,
    attempt: int = 1,
) -> RemotePage | None:
    """Start the page on the aggregator host and wait (PAGE_WAIT at most) for its address; None, with
    the reason logged as an error, when it cannot start: the session goes on without its page."""
    token_file = str(plan.session_dir / REMOTE_TOKEN_FILE)
    argv = view_command(plan, settings_file, token_file)
    if remote_command is not None:
        argv = [*remote_command, *argv[3:]]
    configured = plan.streaming.live.token
    secret = (token_file, configured.get_secret_value() + "\n") if configured is not None else None
    logs = view_log(plan, attempt)
    pid = None
    try:
        pid = start_remote_process(ssh, argv, logs, token=process_token, secret_file=secret)
        wait = min(ssh.command_timeout, PAGE_WAIT)
        address, token = wait_remote_line(ssh, pid, logs, "live: ", wait, then_read=token_file)
    except RemoteError as exc:
        log.error("the live page on %s did not start; the session goes on without it: %s", ssh.host, exc)
        if pid is not None:
            stop_view(ssh, pid, process_token)
        return None
    if not plan.streaming.live.needs_token:
        token = ""
    if token:  # for the user's own terminal only (mode 0600), as a local session's view leaves it
        write_token(plan.session_dir / TOKEN_FILE, token)
    log.info("live page on %s as PID %d: %s", ssh.host, pid, address)
    return RemotePage(pid, address, token)


def stop_view(ssh: SshSettings, pid: int, process_token: str | None) -> None:
    """Stop the remote page's process group; a failure is logged (the page never holds up a release)."""
    try:
        stop_remote_process(ssh, pid, token=process_token)
    except RemoteError as exc:
        log.warning("could not stop the live page (PID %d on %s): %s", pid, ssh.host, exc)


def stop_remote_groups(ssh: SshSettings, pids: list[int], process_token: str | None) -> None:
    """Stop these process groups on the host at once (an SSH session each: the page's shutdown and the
    aggregator's overlap); every one is tried, then the first failure is raised."""
    if not pids:
        return
    with ThreadPoolExecutor(len(pids), thread_name_prefix="ssh-stop") as pool:
        futures = [pool.submit(stop_remote_process, ssh, pid, token=process_token) for pid in pids]
    errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
    if errors:
        raise errors[0]
