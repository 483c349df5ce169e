"""stop_on_signals: a clean stop on SIGTERM, and with a grace period a stop that hangs still ends the process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from stemstream_testing.support import wait_until

PROGRAM = textwrap.dedent(
    """
    import sys, threading
    from streaming.signals import stop_on_signals
    stopped = threading.Event()
    hang = sys.argv[1] == "hang"
    with stop_on_signals(lambda: None if hang else stopped.set(), grace=float(sys.argv[2])):
        print("ready", flush=True)
        stopped.wait(60)  # a stop that never comes when hanging: the deadline must end the process
    print("clean stop", flush=True)
    threading.Event().wait(3 * float(sys.argv[2]))  # the process goes on after the block: no deadline fires
    print("still running", flush=True)
    """
)


def _run(mode: str, grace: float) -> tuple[int, str, str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, mode, str(grace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: proc.poll() is not None, timeout=30, interval=0.05)
        elapsed = time.monotonic() - t0
        out, err = proc.communicate(timeout=10)
        return proc.returncode, out, err, elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_clean_stop_ends_the_block_and_never_the_deadline() -> None:
    code, out, err, _ = _run("clean", grace=0.5)
    assert code == 0 and "clean stop" in out and "still running" in out, err
    assert "clean stop did not end" not in err


def test_a_stop_that_hangs_ends_the_process_after_the_grace_with_every_stack() -> None:
    code, out, err, elapsed = _run("hang", grace=0.5)
    assert code == 128 + signal.SIGTERM, (code, err)
    assert "clean stop" not in out
    assert "clean stop did not end 0.5 s after signal 15" in err
    assert "most recent call first" in err and "threading.py" in err  # every stack: the main one waits
    assert elapsed >= 0.5
