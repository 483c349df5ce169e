"""Counting workers are spawned without this process's __main__ (streaming/node/workers/spawning.py): hidden from
spawn's preparation while a worker starts, then exactly as it was."""

from __future__ import annotations

import multiprocessing as mp
import sys

from streaming.node.workers.spawning import main_not_imported


def _main_name(conn) -> None:
    conn.send(sorted(k for k in sys.modules if k in ("pytest", "_pytest")))


def test_a_spawned_worker_does_not_import_main_and_main_is_put_back() -> None:
    main = sys.modules["__main__"]
    before = (main.__dict__.get("__spec__"), main.__dict__.get("__file__"))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_main_name, args=(child,))
    with main_not_imported():
        assert main.__spec__ is None and "__file__" not in main.__dict__
        proc.start()
    assert (main.__dict__.get("__spec__"), main.__dict__.get("__file__")) == before
    assert parent.recv() == []  # the suite's main (pytest's) was not run in the worker
    proc.join(10)
    assert proc.exitcode == 0
