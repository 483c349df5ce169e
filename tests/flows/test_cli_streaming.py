"""The README's streaming-by-hand procedure, as processes: aggregator, two nodes and the sender started from
the command line give the same HDF5 as `stemstream count` on the same raw files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from counting.sparse import read_counted_scan
from tasks.plan import free_port

CLI = [sys.executable, "-m", "flows.cli"]
pytestmark = pytest.mark.timeout(240)


def start(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*CLI, *args], stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def test_readme_streaming_by_hand_matches_offline_count(tmp_path):
    sim = subprocess.run(
        [*CLI, "simulate", "--out", "raw", "--scan", "12x10", "--seed", "5", "--dark-frames", "20"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sim.returncode == 0, sim.stderr
    recv, nodes, mon, writer = (f"tcp://127.0.0.1:{free_port()}" for _ in range(4))
    procs = [
        start(
            ["aggregator", "--receivers", recv, "--nodes-bind", nodes, "--nodes", "2", "--monitor-bind", mon],
            tmp_path / "agg.log",
            tmp_path,
        )
    ]
    try:
        procs.append(
            start(
                [
                    "node",
                    "--aggregator",
                    nodes,
                    "--output-dir",
                    "out",
                    "--writer-bind",
                    writer,
                    "--dark",
                    "raw/dark.npy",
                    "--name",
                    "n0",
                ],
                tmp_path / "n0.log",
                tmp_path,
            )
        )
        procs.append(
            start(
                ["node", "--aggregator", nodes, "--writer", writer, "--name", "n1"],
                tmp_path / "n1.log",
                tmp_path,
            )
        )
        send = subprocess.run(
            [*CLI, "send", "--aggregator", recv, "--raw", "raw", "--timeout", "120"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert send.returncode == 0, send.stderr
        assert "sent 480 sectors" in send.stdout
        deadline = time.monotonic() + 60
        records: list[Path] = []
        while not records and time.monotonic() < deadline:
            records = sorted((tmp_path / "out").glob("FOURD_*_00000_00001.json"))
            time.sleep(0.1)
        assert records, (tmp_path / "n0.log").read_text()[-2000:]
    finally:
        stop(procs)
    assert all(p.returncode is not None for p in procs)
    record = json.loads(records[0].read_text())
    assert record["status"] == "complete" and record["frames_written"] == 120
    count = subprocess.run(
        [*CLI, "count", "raw", "--dark", "raw/dark.npy", "--out", "offline.h5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert count.returncode == 0, count.stderr
    streamed = read_counted_scan(records[0].with_suffix(".h5"))
    offline = read_counted_scan(tmp_path / "offline.h5")
    for a, b in zip(streamed.events.ravel(), offline.events.ravel(), strict=True):
        np.testing.assert_array_equal(a, b)
    ours, theirs = streamed.metadata["electron_counting"], offline.metadata["electron_counting"]
    assert ours["background_threshold"] == theirs["background_threshold"]
    assert ours["x_ray_threshold"] == theirs["x_ray_threshold"]
