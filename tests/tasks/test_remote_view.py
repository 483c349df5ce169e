"""The NERSC backend's live page over a real OpenSSH sshd on loopback: started beside the aggregator with the
session's process token, its address and token read back (a configured token sent on stdin, never in a
command line or a log), a page that dies reported without ending the session, and the page stopped with
the aggregator on every way out (stop, and the cleanup hook's release from the state file alone)."""

from __future__ import annotations

import logging
import stat
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from streaming.settings import LiveSettings, StreamingSettings
from tasks.launch.backends import SshAggregator
from tasks.launch.errors import AggregatorExited
from tasks.launch.plan import SessionPlan
from tasks.launch.remote_view import REMOTE_TOKEN_FILE, RemotePage, start_remote_view
from tasks.launch.state import SessionState
from tasks.settings import SshSettings
from tasks.ssh import (
    ForeignProcess,
    RemoteCommandFailed,
    start_remote_process,
    stop_remote_process,
    wait_remote_line,
)

from .helpers import alive, wait_until

# A stand-in for `stemstream view` (its argv after `-m flows.cli`): as the page does, it takes its token from
# --token-file (writing a random one there when there is none), prints its address, and serves until stopped.
FAKE_VIEW = """
import os, sys, time
argv = sys.argv[1:]
path = argv[argv.index("--token-file") + 1]
if not os.path.exists(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"random-token-from-the-page\\n")
    os.close(fd)
time.sleep(0.3)
print("live: http://127.0.0.1:17080/", flush=True)
print("token: in", path, flush=True)
time.sleep(60)
"""


def _plan(tmp_path: Path, live: LiveSettings) -> SessionPlan:
    session_dir = tmp_path / "session"
    (session_dir / "logs").mkdir(parents=True)
    return SessionPlan(
        session_id=1,
        session_dir=session_dir,
        output_dir=session_dir / "scans",
        settings_file=session_dir / "settings.json",
        streaming=StreamingSettings(live=live),
        nodes_connect="tcp://127.0.0.1:1",
        monitor_connect="tcp://127.0.0.1:2",
    )


def test_the_page_starts_with_the_configured_token_which_never_shows(
    sshd: SshSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "saffron-lantern-" + uuid.uuid4().hex
    plan = _plan(tmp_path, LiveSettings(token=SecretStr(secret), token_required=True))
    token = uuid.uuid4().hex
    page = start_remote_view(sshd, plan, "/remote/settings.json", [sys.executable, "-c", FAKE_VIEW], token)
    assert page is not None
    try:
        assert page.url == "http://127.0.0.1:17080/" and page.token == secret
        assert secret not in repr(page)
        remote = plan.session_dir / REMOTE_TOKEN_FILE  # on the aggregator host: 0600, from stdin
        local = plan.session_dir / "live-token"  # the session's own, for the user's terminal
        for path in (remote, local):
            assert path.read_text().strip() == secret and stat.S_IMODE(path.stat().st_mode) == 0o600
        cmdline = Path(f"/proc/{page.pid}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{page.pid}/environ").read_bytes().decode()
        assert "--token-file" in cmdline and secret not in cmdline and token in environ
        assert "/remote/settings.json" in cmdline  # the aggregator's settings file on the host
        log_text = (plan.session_dir / "logs" / "view-remote.log").read_text()
        assert "live: http://127.0.0.1:17080/" in log_text and secret not in log_text
        assert secret not in caplog.text
    finally:
        SshAggregator(sshd, token=token, page=page).stop()
    assert not alive(page.pid)


def test_a_random_token_comes_back_and_a_loopback_page_without_one_needs_none(
    sshd: SshSettings, tmp_path: Path
) -> None:
    plan = _plan(tmp_path, LiveSettings(token_required=True))
    page = start_remote_view(sshd, plan, "/s.json", [sys.executable, "-c", FAKE_VIEW], "t1")
    assert page is not None
    SshAggregator(sshd, token="t1", page=page).stop()
    assert page.token == "random-token-from-the-page"
    assert (plan.session_dir / "live-token").read_text().strip() == page.token

    plan = _plan(tmp_path / "open", LiveSettings())  # loopback, no token asked for
    page = start_remote_view(sshd, plan, "/s.json", [sys.executable, "-c", FAKE_VIEW], "t2", attempt=2)
    assert page is not None
    SshAggregator(sshd, token="t2", page=page).stop()
    assert page.token == "" and not (plan.session_dir / "live-token").exists()
    assert (plan.session_dir / "logs" / "view-remote-2.log").exists()  # a retry's own log


def test_a_page_that_dies_is_reported_and_the_session_goes_on(
    sshd: SshSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = _plan(tmp_path, LiveSettings())
    dies = [sys.executable, "-c", "import sys, time; time.sleep(0.4); sys.exit('no page: port taken')"]
    assert start_remote_view(sshd, plan, "/s.json", dies, "t") is None
    assert "did not start; the session goes on without it" in caplog.text
    assert "no page: port taken" in caplog.text  # the end of its log says why


def test_waiting_for_a_line_that_never_comes_is_bounded(sshd: SshSettings, tmp_path: Path) -> None:
    log_path = str(tmp_path / "quiet.log")
    pid = start_remote_process(sshd, "sleep 30", log_path, token="q")
    try:
        with pytest.raises(RemoteCommandFailed, match="no live: line after 0.5 s"):
            wait_remote_line(sshd, pid, log_path, "live: ", 0.5)
    finally:
        SshAggregator(sshd, token="q", pid=pid).stop()
    assert not alive(pid)


def _two(sshd: SshSettings, tmp_path: Path, token: str) -> tuple[int, int]:
    """An aggregator and a page stand-in on the host, both carrying the session's process token."""
    aggregator, view = (
        start_remote_process(sshd, "sleep 60", str(tmp_path / f"{name}.log"), token=token)
        for name in ("aggregator", "view")
    )
    return aggregator, view


def test_the_flows_release_stops_the_page_with_the_aggregator(sshd: SshSettings, tmp_path: Path) -> None:
    """A normal end, a failure, a cancel: the flow's release stops the backend it started."""
    token = uuid.uuid4().hex
    aggregator_pid, view_pid = _two(sshd, tmp_path, token)
    backend = SshAggregator(sshd, token=token, pid=aggregator_pid, page=RemotePage(view_pid, "http://x/"))
    state = SessionState(tmp_path / "s1")
    backend.record(state)
    assert (state.aggregator_pid, state.view_pid, state.live_url) == (aggregator_pid, view_pid, "http://x/")
    backend.stop()
    assert not alive(aggregator_pid) and not alive(view_pid)
    assert backend.pid is None and backend.page is None
    backend.stop()  # idempotent


def test_the_cleanup_hook_stops_the_page_from_the_state_file_alone(sshd: SshSettings, tmp_path: Path) -> None:
    """A crash: the cleanup hook has the state file only."""
    token = uuid.uuid4().hex
    aggregator_pid, view_pid = _two(sshd, tmp_path, token)
    state = SessionState(tmp_path / "s2", aggregator_pid=aggregator_pid, aggregator_token=token)
    state.view_pid = view_pid
    state.save()
    SshAggregator(sshd).release_recorded(SessionState.load(tmp_path / "s2"))
    assert wait_until(lambda: not alive(aggregator_pid) and not alive(view_pid), timeout=5)


def test_a_page_pid_that_is_not_ours_is_refused_and_the_aggregator_still_stopped(
    sshd: SshSettings, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    aggregator = start_remote_process(sshd, "sleep 60", str(tmp_path / "aggregator.log"), token=token)
    other = start_remote_process(sshd, "sleep 60", str(tmp_path / "other.log"))  # as a reused PID
    try:
        backend = SshAggregator(sshd, token=token, pid=aggregator, page=RemotePage(other, "http://x/"))
        with pytest.raises(ForeignProcess):
            backend.stop()
        assert not alive(aggregator) and alive(other)  # both tried; the stranger left alone
    finally:
        stop_remote_process(sshd, other, grace=0.5)


def test_an_aggregator_that_exits_after_its_start_is_named_with_the_end_of_its_log(
    sshd: SshSettings, tmp_path: Path
) -> None:
    """A bad setting ends the aggregator after its imports, later than start's settle (ci41: two paths'
    ports collided): check() looks at it over SSH a few times early (LOOKS_AT) and raises with the end of its
    log, where the session would otherwise wait out its ready timeout with "no state from the aggregator"."""
    plan = _plan(tmp_path, LiveSettings(enabled=False))
    plan.settings_file.write_text("{}")
    why = "error: nodes_bind of path 1 would bind tcp://127.0.0.1:21252, already the receiver 0 of path 0"
    exits = [sys.executable, "-c", f"import sys, time; time.sleep(1.5); sys.exit({why!r})"]
    aggregator = SshAggregator(sshd, remote_command=exits)
    aggregator.start(plan)
    raised: list[str] = []

    def exited() -> bool:
        try:
            aggregator.check()
        except AggregatorExited as exc:
            raised.append(str(exc))
            return True
        return False

    try:
        assert not exited()  # before its first look (LOOKS_AT[0] s after the start): nothing said yet
        assert wait_until(exited, timeout=20, interval=0.2)
        assert why in raised[0] and f"(PID {aggregator.pid}) exited" in raised[0]
    finally:
        aggregator.stop()
