"""Supervision (audit M8, M1's cleanup): a session's processes die with it, a cleanup stops by SIGTERM before
SIGKILL and frees the session's shared memory, a remote stop signals only the process it started, and a
part that dies is named by the session. Real processes, sockets and sshd on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stemstream_testing.support import CLI, free_port
from tasks.launch.processes import ProcessGroup, carrying, kill_carrying
from tasks.settings import SshSettings
from tasks.ssh import ForeignProcess, start_remote_process, stop_remote_process
from tests.tasks.helpers import alive, wait_until

pytestmark = pytest.mark.timeout(240)


def _port_free(address: str) -> bool:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: TIME_WAIT is no holder
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def _session(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, dict[str, str], list[str]]:
    """`stemstream session --camera instrument` on loopback ports of its own, its output in a file."""
    np.save(tmp_path / "dark.npy", np.zeros((576, 576), np.float32))
    addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(4)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEMSTREAM_", "PREFECT_"))}
    env |= {
        "STEMSTREAM_OUTPUT_DIR": str(tmp_path / "out"),
        "STEMSTREAM_CONFIG": str(tmp_path / "none.toml"),
        "STEMSTREAM_STREAMING__RECEIVERS": json.dumps([addresses[0]]),
        "STEMSTREAM_STREAMING__NODES_BIND": addresses[1],
        "STEMSTREAM_STREAMING__MONITOR_BIND": addresses[2],
        "STEMSTREAM_STREAMING__LIVE__BIND": addresses[3],
        "STEMSTREAM_STREAMING__LIVE__PAGE_PORT": "0",
        "STEMSTREAM_COUNTING__DARK": str(tmp_path / "dark.npy"),
        "STEMSTREAM_SESSION__POSTPROCESS": "false",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    (tmp_path / "none.toml").write_text("")
    out = open(tmp_path / "session.out", "w")  # noqa: SIM115 (closed with the test's tmp_path)
    proc = subprocess.Popen(
        [*CLI, "session", "--camera", "instrument", "--nodes", "1", *args],
        cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return proc, env, addresses


def _text(tmp_path: Path) -> str:
    return (tmp_path / "session.out").read_text(errors="replace")


def _session_pids(tmp_path: Path) -> list[int]:
    """Every live process carrying one of the session's process tokens."""
    states = list((tmp_path / "out" / "sessions").glob("*/session.json"))
    tokens = json.loads(states[0].read_text()).get("process_tokens", []) if states else []
    return [pid for token in tokens for pid in carrying(token)]


def _mapped_shm(pid: int) -> set[str]:
    """The /dev/shm files a process has mapped."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set()
    return {part for line in lines for part in line.split()[5:6] if part.startswith("/dev/shm/")}


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _with_env(entry: str) -> list[int]:
    """Live processes (not this one) whose environment holds this exact NAME=value entry."""
    needle = entry.encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def _wchan(pid: int) -> str:
    """Where a process waits in the kernel (a diagnostic for one that outlives its session)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "?"


def _stop(proc: subprocess.Popen, tmp_path: Path) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    # A SIGKILLed session leaves its embedded Prefect server (Prefect's own child, started without the
    # session's process token): stop it here, found by the PREFECT_HOME this test gave the session.
    for pid in _with_env(f"PREFECT_HOME={tmp_path / 'prefect'}"):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    states = list((tmp_path / "out" / "sessions").glob("*/session.json"))
    if states:
        kill_carrying(json.loads(states[0].read_text()).get("process_tokens", []), grace=1)


def test_a_sigkilled_session_takes_its_processes_and_ports_with_it(tmp_path: Path) -> None:
    """M8 repro: SIGKILL the session; its node, counting workers, aggregator and view end (parent-death
    signal, their clean stop), the receiver and node ports are free again and no slot memory is left."""
    proc, _, addresses = _session(tmp_path)
    try:
        assert wait_until(lambda: "ready:" in _text(tmp_path) or proc.poll() is not None, timeout=150)
        assert "ready:" in _text(tmp_path), _text(tmp_path)[-3000:]
        pids = _session_pids(tmp_path)
        assert len(pids) >= 3  # node (and its workers), aggregator, view
        segments = {seg for pid in pids for seg in _mapped_shm(pid)}
        assert segments  # the node's slot memory
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # bounded, generous waits (each child stops cleanly: the node writes what it holds first)
        left = lambda: [(p, _argv(p)[4:9], _wchan(p)) for p in pids if alive(p)]  # noqa: E731 - which, where
        assert wait_until(lambda: not left(), timeout=60), left()
        assert wait_until(lambda: all(_port_free(a) for a in addresses[:2]), timeout=5)
        assert not [seg for seg in segments if os.path.exists(seg)]  # released by the clean stops
    finally:
        _stop(proc, tmp_path)


def test_cleanup_terms_before_it_kills_and_unlinks_the_shared_memory_left(tmp_path: Path) -> None:
    """M1: the cleanup hook's stop gives SIGTERM first (a process that stops cleanly on it does), SIGKILLs
    one that ignores it after the grace, and unlinks /dev/shm segments the killed processes held."""
    group = ProcessGroup(tmp_path / "logs")
    marker = tmp_path / "termed"
    polite = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(0)))\n"
        "time.sleep(60)\n"
    )
    stubborn = (
        "import signal, time\nfrom multiprocessing import shared_memory\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "m = shared_memory.SharedMemory(create=True, size=4096)\nprint(m.name, flush=True)\ntime.sleep(60)\n"
    )
    a = group.start("polite", [sys.executable, "-c", polite])
    b = group.start("stubborn", [sys.executable, "-c", stubborn])
    try:
        assert wait_until(lambda: "psm_" in b.log_path.read_text(), timeout=20)
        name = b.log_path.read_text().split()[0]
        assert os.path.exists(f"/dev/shm/{name}")
        t = time.monotonic()
        kill_carrying([group.token], grace=1.0)  # as the hook does, without the ProcessGroup
        assert time.monotonic() - t < 6
        assert a.popen.wait(5) == 0 and marker.exists()  # stopped by SIGTERM, cleanly
        assert b.popen.wait(5) == -signal.SIGKILL
        assert not os.path.exists(f"/dev/shm/{name}")
        assert carrying(group.token) == []
    finally:
        group.stop(grace=1)


def test_remote_stop_refuses_a_pid_that_is_not_the_process_it_started(
    sshd: SshSettings, tmp_path: Path
) -> None:
    """M8: a stop with the session's token signals only a process whose environment carries it (a PID
    reused by another process is refused with a clear error and left alone)."""
    ours = start_remote_process(sshd, "sleep 60", str(tmp_path / "ours.log"), token="a" * 32)
    other = start_remote_process(sshd, "sleep 60", str(tmp_path / "other.log"))  # as a reused PID
    try:
        with pytest.raises(ForeignProcess, match=f"refusing to stop PID {other}"):
            stop_remote_process(sshd, other, grace=0.5, token="a" * 32)
        with pytest.raises(ForeignProcess):
            stop_remote_process(sshd, ours, grace=0.5, token="b" * 32)
        assert alive(other) and alive(ours)
        assert stop_remote_process(sshd, ours, grace=2, token="a" * 32) == "terminated"
        assert not alive(ours)
        assert stop_remote_process(sshd, ours, token="a" * 32) == "not-running"
    finally:
        for pid in (ours, other):
            if alive(pid):
                stop_remote_process(sshd, pid, grace=0.5)


def test_a_dead_live_view_is_named_by_the_session(tmp_path: Path) -> None:
    """M8: the live view's process exits mid-session; within seconds the session says so by name and goes
    on (its end never ends the session)."""
    proc, _, _ = _session(tmp_path)
    try:
        assert wait_until(lambda: "ready:" in _text(tmp_path) or proc.poll() is not None, timeout=150)
        assert "ready:" in _text(tmp_path), _text(tmp_path)[-3000:]
        views = [p for p in _session_pids(tmp_path) if "view" in _argv(p)]
        assert views
        os.kill(views[0], signal.SIGKILL)
        assert wait_until(lambda: "live view exited" in _text(tmp_path), timeout=15), _text(tmp_path)[-3000:]
        assert proc.poll() is None
    finally:
        _stop(proc, tmp_path)


def test_a_session_ended_mid_scan_lists_the_partial_scan_and_says_so_in_its_exit_status(
    tmp_path: Path,
) -> None:
    """M1 (session side): --duration ends the session while a scan streams; the counted part is kept as an
    incomplete file (reason shutdown), the summary lists it, the final message names it and the exit
    status is 3 (STOPPED_MID_SCAN), not 0."""
    # --duration counts from `ready:`; the sender (a CLI process starting four sender processes) took over
    # 20 s to deliver its first sector at a load of 10, so the session ended before the scan began. 30 s, and
    # a rate slow enough that the scan is still streaming when they end, whenever within them it began.
    proc, env, addresses = _session(tmp_path, "--duration", "30")
    sender = None
    try:
        assert wait_until(lambda: "ready:" in _text(tmp_path) or proc.poll() is not None, timeout=150)
        assert "ready:" in _text(tmp_path), _text(tmp_path)[-3000:]
        sender = subprocess.Popen(
            [*CLI, "send", "--aggregator", addresses[0], "--simulate", "32x32", "--rate", "10"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip: 1024 frames at 10/s, far longer than the session
        code = proc.wait(120)
        text = _text(tmp_path)
        assert code == 3, text[-3000:]
        assert "stopped mid-scan" in text and "shutdown" in text, text[-3000:]
        assert "1 scan(s) stopped mid-scan" in text and "session summary" in text, text[-3000:]
        [record] = (tmp_path / "out").rglob("FOURD_*.json")
        saved = json.loads(record.read_text())
        assert saved["status"] == "incomplete" and 0 < saved["completeness"] < 1
        assert "shutdown" in saved["reasons"]
    finally:
        if sender is not None:
            sender.kill()
            sender.wait(10)
        _stop(proc, tmp_path)


def test_a_node_whose_writer_fails_is_named_by_the_session(tmp_path: Path) -> None:
    """M8: a real fault kills a node's part (its hosted scan writer cannot store: the scans directory became
    a file); the node exits non-zero with the cause and the session fails naming that node and the writer."""
    proc, env, addresses = _session(tmp_path)
    try:
        assert wait_until(lambda: "ready:" in _text(tmp_path) or proc.poll() is not None, timeout=150)
        assert "ready:" in _text(tmp_path), _text(tmp_path)[-3000:]
        [scans] = (tmp_path / "out" / "sessions").glob("*/scans")
        for leftover in scans.iterdir():
            leftover.unlink()
        scans.rmdir()
        scans.write_text("not a directory\n")  # a fault even root cannot write through
        sent = subprocess.run(
            [*CLI, "send", "--aggregator", addresses[0], "--simulate", "16x16", "--timeout", "20"],
            cwd=tmp_path, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        # The session fails as soon as node0 exits and then stops the aggregator: a module still sending by
        # then cannot finish (the sender says which); either way the scan's data was offered.
        stderr = sent.stderr.decode(errors="replace")
        assert sent.returncode == 0 or "did not finish" in stderr, stderr[-2000:]
        assert proc.wait(120) != 0
        text = _text(tmp_path)
        assert "node streamer node0 exited with code 1" in text and "scan writer failed" in text, text[-3000:]
    finally:
        _stop(proc, tmp_path)


def test_the_live_view_process_ends_when_its_intake_stops(tmp_path: Path) -> None:
    """M8: the view serves only while its parts run: an intake that stopped ends run_until with the part
    named (the view command then exits non-zero), within a second."""

    from streaming.settings import LiveSettings
    from streaming.view.server import LiveServer, LiveViewFailed

    live = LiveSettings(bind=f"tcp://127.0.0.1:{free_port()}", page_host="127.0.0.1", page_port=0)
    server = LiveServer(live).start()
    try:
        done = threading.Event()
        t = time.monotonic()
        server.run_until(done, timeout=0.6)  # healthy: serves until the timeout
        assert time.monotonic() - t >= 0.5
        server.ingest.close()  # the intake thread ends
        t = time.monotonic()
        with pytest.raises(LiveViewFailed, match="snapshot intake stopped"):
            server.run_until(done, timeout=30)
        assert time.monotonic() - t < 1.5
    finally:
        server.stop()
