"""SIGTERM and SIGINT as a clean stop for the long-running processes (aggregator, node, live view)."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
# The aggregator holds no data of its own at a stop (the nodes write what they hold): its clean stop takes
# well under a second, so 20 s is only ever reached by a stop that hangs.
STOP_GRACE_S = 20.0


@contextmanager
def stop_on_signals(stop: Callable[[], None], grace: float | None = None) -> Iterator[None]:
    """Call stop() on SIGTERM/SIGINT inside the block (main thread only: elsewhere signals cannot be
    handled, and the block runs unchanged); the previous handlers come back afterwards.

    With ``grace``, a clean stop that has not ended ``grace`` seconds after the first signal ends the
    process (exit status 128 + the signal), after writing every thread's stack to stderr: a process whose
    parent died must not outlive it holding its ports, whatever its stop waits on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[int] = []
    ended = threading.Event()  # the block is over: a deadline still waiting must never fire

    def handler(signum: int, _frame: object) -> None:
        if grace is not None and not first:
            first.append(signum)
            threading.Thread(
                target=_deadline, args=(grace, signum, ended), name="stop-deadline", daemon=True
            ).start()
        stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        ended.set()
        for s, saved in previous.items():
            signal.signal(s, saved)


def _deadline(grace: float, signum: int, ended: threading.Event) -> None:
    """Exit if the block has not ended grace seconds after the signal (it may run on in this process)."""
    if ended.wait(grace):
        return
    log.error(
        "clean stop did not end %g s after signal %d: exiting now (every thread's stack below)", grace, signum
    )
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)
