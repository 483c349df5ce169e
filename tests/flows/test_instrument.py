"""Instrument sessions, as a microscopist runs them: `stemstream session --camera instrument` counts every
scan an independent camera (here `stemstream send`, another process) delivers, of any shape, at any pace,
with scan numbers that come again; it ends on --scans, on --duration, or when cancelled."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.states import Cancelling

from counting.sparse import read_counted_scan
from stemstream_testing.cli import in_process
from stemstream_testing.support import CLI, free_port
from tests.flows.conftest import set_env
from tests.tasks.helpers import wait_until

pytestmark = pytest.mark.timeout(300)
# (scan number, WxH): three shapes, and scan 1 again (the detector reset its numbers)
SCRIPT = [(1, "16x8"), (2, "24x12"), (1, "12x10")]
SCAN_TIMEOUT = 1.0  # session.scan_timeout, the old per-scan limit; the microscopist's pauses are longer
PAUSE = 1.5 * SCAN_TIMEOUT
# --duration of the first session in the duration test: a scan (four sender processes) must fit in it on a
# loaded machine (12 s did not, at a load of 9 on 2 cores)
DURATION = 25


def run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw files of each scripted scan (one detector: the same dark) and their offline counts, made once for
    the module by the CLI in this process (the sessions and the camera under test are processes)."""
    where = tmp_path_factory.mktemp("instrument-raw")
    env = {k: v for k, v in os.environ.items() if k.startswith("STEMSTREAM_")}
    for k, (number, shape) in enumerate(SCRIPT):
        args = ["simulate", "--out", f"raw{k}", "--scan", shape, "--seed", "5", "--scan-number", str(number)]
        done = in_process([*args, "--dark-frames", "20"], env, where)
        assert done.returncode == 0, done.stderr
        done = in_process(
            ["count", f"raw{k}", "--dark", "raw0/dark.npy", "--out", f"offline{k}.h5"], env, where
        )
        assert done.returncode == 0, done.stderr
    # one Prefect home for the module's sessions (one after another on a worker): the embedded server's
    # database is made once, not once per session
    (where / "prefect").mkdir()
    return where


@pytest.fixture
def raw_scans(raw_dir: Path, tmp_path: Path) -> Path:
    """This test's own working directory, with the module's raw scans and offline counts in it (links)."""
    for item in raw_dir.iterdir():
        (tmp_path / item.name).symlink_to(item)
    return tmp_path


def session_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], str]:
    """A clean environment for `stemstream session`: its own output, Prefect home and loopback ports."""
    recv, nodes, monitor = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEMSTREAM_", "PREFECT_"))}
    env |= {
        "STEMSTREAM_OUTPUT_DIR": str(tmp_path / "out"),
        "STEMSTREAM_CONFIG": str(tmp_path / "none.toml"),
        "STEMSTREAM_STREAMING__RECEIVERS": json.dumps([recv]),
        "STEMSTREAM_STREAMING__NODES_BIND": nodes,
        "STEMSTREAM_STREAMING__MONITOR_BIND": monitor,
        # the live view's intake: a port of this test's own (the default is one port for the whole machine)
        "STEMSTREAM_STREAMING__LIVE__BIND": f"tcp://127.0.0.1:{free_port()}",
        "STEMSTREAM_STREAMING__LIVE__PAGE_PORT": "0",
        "STEMSTREAM_STREAMING__SCAN_DEADLINE": "3",  # the four sender processes start up to ~2 s apart
        "STEMSTREAM_COUNTING__DARK": str(tmp_path / "raw0" / "dark.npy"),
        "STEMSTREAM_SESSION__POSTPROCESS": "false",
        "STEMSTREAM_SESSION__SCAN_TIMEOUT": str(SCAN_TIMEOUT),  # the old per-scan limit: pauses are longer
        "PREFECT_HOME": str((tmp_path / "prefect").resolve()),
        **extra,
    }
    (tmp_path / "none.toml").write_text("")
    return env, recv


class Session:
    """`stemstream session` as a process; its output collected line by line."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [*CLI, "session", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if line.startswith(prefix)]
            if found:
                return found[0]
            assert self.proc.poll() is None, "\n".join(self.lines[-40:])
            time.sleep(0.1)
        raise AssertionError(f"no {prefix!r} line:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def identical(a: Path, b: Path) -> bool:
    x, y = read_counted_scan(a), read_counted_scan(b)
    if x.events.shape != y.events.shape or x.completeness != 1.0:
        return False
    return all(np.array_equal(p, q) for p, q in zip(x.events.ravel(), y.events.ravel(), strict=True))


def test_instrument_session_counts_any_scan_at_any_pace(raw_scans: Path) -> None:
    """Three scans of three shapes with pauses longer than the old scan timeout, a scan number that comes
    again, and a scan sent before the session was ready (refused, reported, no file): three files, each
    identical to `stemstream count` on its raw files; one `ready:` line, a line per scan; exit 0."""
    env, recv = session_env(raw_scans)
    session = Session(["--camera", "instrument", "--scans", "3"], raw_scans, env)
    early = subprocess.Popen(
        [*CLI, "send", "--aggregator", recv, "--raw", "raw0", "--scan-number", "99", "--timeout", "120"],
        cwd=raw_scans,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = session.wait_line("ready:")
        assert early.wait(120) == 0, early.stdout.read()
        for k, (number, _) in enumerate(SCRIPT):
            time.sleep(PAUSE)  # the microscopist aligns: longer than session.scan_timeout
            sent = run(
                ["send", "--aggregator", recv, "--raw", f"raw{k}", "--scan-number", str(number)], raw_scans
            )
            assert sent.returncode == 0, sent.stderr
            session.wait_line(f"scan {number} (id {k + 1:05d})")
        code = session.finish()
    finally:
        if early.poll() is None:
            early.kill()
        session.finish(30)
    assert code == 0, session.text[-4000:]
    assert ready == f"ready: receivers {recv}"
    scans_dir = Path(re.search(r"^HDF5 files: (.+)$", session.text, re.M).group(1))
    files = sorted(scans_dir.glob("FOURD_*.h5"))
    assert [f.name[-14:] for f in files] == ["00001_00001.h5", "00002_00002.h5", "00003_00001.h5"]
    for k, path in enumerate(files):
        assert identical(path, raw_scans / f"offline{k}.h5"), path.name
    assert "scan(s) 99 (" in session.text and "arrived before the session was ready" in session.text
    assert not list(scans_dir.glob("*_00099.h5"))
    lines = [line for line in session.lines if re.match(r"scan \d+ \(id \d{5}\): ", line)]
    assert len(lines) == 3 and all("complete, 100.00 % complete" in line for line in lines)


def test_instrument_session_ends_on_duration_and_ids_go_on_across_sessions(raw_scans: Path) -> None:
    """--duration ends a session with whatever it counted; a second session writing to the same directory
    (session.scan_dir) gives the next unique id, whatever the scan number."""
    shared = raw_scans / "shared-scans"
    env, recv = session_env(raw_scans, STEMSTREAM_SESSION__SCAN_DIR=str(shared))
    first = Session(["--camera", "instrument", "--duration", str(DURATION)], raw_scans, env)
    first.wait_line("ready:")
    assert run(["send", "--aggregator", recv, "--raw", "raw0"], raw_scans).returncode == 0
    first.wait_line("scan 1 (id 00001)")
    t0 = time.monotonic()
    assert first.finish(120) == 0, first.text[-3000:]
    assert time.monotonic() - t0 < 60
    second = Session(["--camera", "instrument", "--scans", "1"], raw_scans, env)
    second.wait_line("ready:")
    assert run(["send", "--aggregator", recv, "--raw", "raw0"], raw_scans).returncode == 0
    second.wait_line("scan 1 (id 00002)")
    assert second.finish(120) == 0, second.text[-3000:]
    names = sorted(f.name[-14:] for f in shared.glob("FOURD_*.h5"))
    assert names == ["00001_00001.h5", "00002_00001.h5"]


@pytest.mark.usefixtures("prefect_harness")
def test_instrument_session_ends_when_cancelled_from_the_prefect_api(
    stemstream_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling the flow run (as the UI's Cancel does) ends an instrument session that waits for scans:
    the run ends Cancelled, every process is released."""
    from flows.session import session
    from tests.flows.test_session import assert_nothing_left, read_state_file

    ports = [free_port() for _ in range(3)]
    set_env(monkeypatch, "streaming", receivers=[f"tcp://127.0.0.1:{ports[0]}"])
    set_env(monkeypatch, "streaming", nodes_bind=f"tcp://127.0.0.1:{ports[1]}")
    set_env(monkeypatch, "streaming", monitor_bind=f"tcp://127.0.0.1:{ports[2]}")
    sessions = stemstream_env / "sessions"

    def ready() -> bool:
        for d in sessions.glob("*"):
            try:
                if read_state_file(d).get("ready"):
                    return True
            except (FileNotFoundError, json.JSONDecodeError):  # the session's directory, its state not yet
                pass
        return False

    def cancel_when_ready() -> None:
        if not wait_until(ready, timeout=120):
            return
        run_id = next(d.name for d in sessions.glob("*"))
        for _ in range(10):  # a loaded API may time out once: ask again, a bounded number of times
            try:
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(run_id, Cancelling(), force=True)
                return
            except Exception:  # noqa: BLE001 - any failure of the request: retry
                time.sleep(2)

    canceller = threading.Thread(target=cancel_when_ready, daemon=True)
    canceller.start()
    t0 = time.monotonic()
    state = session(camera="instrument", n_scans=0, postprocess=False, return_state=True)
    canceller.join(10)
    assert state.is_cancelled(), state
    assert time.monotonic() - t0 < 150
    session_dir = next(sessions.glob("*"))
    assert_nothing_left(session_dir)
