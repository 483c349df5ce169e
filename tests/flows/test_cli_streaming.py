"""The README's streaming-by-hand procedure, as processes: the aggregator, N nodes all started with the same
command and the sender, from the command line. One file per scan, identical to `stemstream count` on the
same raw files, whatever a user starts: nodes that cannot join get a clear error, nothing is replaced."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from counting.sparse import read_counted_scan
from stemstream_testing.cli import in_process
from stemstream_testing.pipeline import ProcessPipeline
from stemstream_testing.support import CLI

pytestmark = pytest.mark.timeout(300)


def by_hand(cwd: Path, n_nodes: int, **streaming: object) -> ProcessPipeline:
    """The aggregator, started in cwd; the test starts the nodes with `pipe.start_node(log, output_dir)`: the
    same command for every node (only the log file differs, no --name), as the README has it."""
    node_args = ["--dark", "raw/dark.npy", "--workers", "0"]
    return ProcessPipeline(cwd, n_nodes, streaming=streaming, start_nodes=0, node_args=node_args, names=None)


def send(pipe: ProcessPipeline, *extra: str) -> subprocess.CompletedProcess:
    """`stemstream send --raw raw`: the four receivers, emulated by the CLI."""
    return subprocess.run(
        [*CLI, "send", "--aggregator", pipe.receiver, "--raw", "raw", "--timeout", "120", *extra],
        cwd=pipe.work,
        capture_output=True,
        text=True,
        timeout=180,
    )


def wait_ready(pipe: ProcessPipeline, n: int) -> None:
    """Until n nodes joined and the aggregator designated the writer host."""
    pipe.wait_state(lambda s: s.nodes_connected >= n and s.writer != "", 60)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated raw scan and its offline count, made once for the module by the CLI in this process (the
    streaming commands the tests are about run as processes)."""
    where = tmp_path_factory.mktemp("streaming-raw")
    env = {k: v for k, v in os.environ.items() if k.startswith("STEMSTREAM_")}
    sim = in_process(
        ["simulate", "--out", "raw", "--scan", "12x10", "--seed", "5", "--dark-frames", "20"], env, where
    )
    assert sim.returncode == 0, sim.stderr
    count = in_process(["count", "raw", "--dark", "raw/dark.npy", "--out", "offline.h5"], env, where)
    assert count.returncode == 0, count.stderr
    return where


@pytest.fixture
def raw(raw_dir: Path, tmp_path: Path) -> Path:
    """This test's working directory (its own out/), with the module's raw scan and offline count linked in."""
    for name in ("raw", "offline.h5"):
        (tmp_path / name).symlink_to(raw_dir / name)
    return tmp_path


def assert_identical_to_offline(h5: Path, offline: Path) -> None:
    streamed, counted = read_counted_scan(h5), read_counted_scan(offline)
    assert streamed.completeness == 1.0
    for a, b in zip(streamed.events.ravel(), counted.events.ravel(), strict=True):
        np.testing.assert_array_equal(a, b)
    ours, theirs = streamed.metadata["electron_counting"], counted.metadata["electron_counting"]
    assert ours["background_threshold"] == theirs["background_threshold"]
    assert ours["x_ray_threshold"] == theirs["x_ray_threshold"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("n_nodes", [2, 4])
def test_same_node_command_on_every_node_gives_one_file_identical_to_offline(raw: Path, n_nodes: int):
    with by_hand(raw, n_nodes) as pipe:
        for i in range(n_nodes):
            pipe.start_node(f"n{i}")
        pipe.wait_armed(n_nodes)  # as a person does: the aggregator's `ready:` line, then the camera
        sent = send(pipe)
        assert sent.returncode == 0, sent.stderr
        assert "sent 480 sectors" in sent.stdout
        record, h5 = pipe.record(1, timeout=60)
        assert f"ready: all {n_nodes} node(s) armed" in pipe.log("agg")
        time.sleep(1.0)  # a second writer, if there were one, would write now
    records = sorted((raw / "out").glob("FOURD_*.json"))
    assert len(records) == 1 and len(list((raw / "out").glob("*.h5"))) == 1
    assert record.status == "complete" and record.frames_written == 120 and record.nodes == n_nodes
    assert_identical_to_offline(h5, raw / "offline.h5")
    hosts = [i for i in range(n_nodes) if "hosting the scan writer" in pipe.log(f"n{i}")]
    assert len(hosts) == 1  # exactly one writer, chosen by the aggregator


def test_nodes_that_cannot_join_get_a_clear_error_and_nothing_is_replaced(raw: Path):
    """Another --output-dir, and one node more than --nodes: each exits 1 with the reason; the session's
    nodes go on and the scan is complete."""
    with by_hand(raw, 2) as pipe:
        pipe.start_node("n0")
        wait_ready(pipe, 1)
        elsewhere = pipe.start_node("elsewhere", output_dir="other")
        assert elsewhere.wait(60) == 1
        pipe.start_node("n1")
        wait_ready(pipe, 2)
        extra = pipe.start_node("extra")
        assert extra.wait(60) == 1
        sent = send(pipe)
        assert sent.returncode == 0, sent.stderr
        _, h5 = pipe.record(1, timeout=60)
    last = pipe.log("elsewhere").strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused by the aggregator" in last
    assert "was started with --output-dir other, but this session's scans go to out" in last
    assert "Traceback" not in pipe.log("elsewhere")
    assert not (raw / "other").exists() or not list((raw / "other").glob("*.h5"))
    last = pipe.log("extra").strip().splitlines()[-1]
    assert last.startswith("error: ") and "all 2 node slots are taken" in last
    assert_identical_to_offline(h5, raw / "offline.h5")


def test_scan_before_every_node_is_up_is_refused_and_the_next_is_whole(raw: Path):
    """The camera sends while only one of two nodes runs (before the session is ready): the aggregator
    drains that scan and counts it as refused, and writes nothing of it; after the late node joins, the
    next scan is complete and identical to offline counting."""
    with by_hand(raw, 2) as pipe:
        pipe.start_node("n0")
        wait_ready(pipe, 1)
        early = send(pipe, "--scan-number", "1")
        assert early.returncode == 0, early.stderr  # drained, not left waiting
        refused = pipe.wait_state(lambda s: s.refused_scans.get(1) == 480, timeout=30)
        pipe.start_node("n1")
        pipe.wait_armed(2)
        assert send(pipe, "--scan-number", "2").returncode == 0
        record, h5 = pipe.record(2, timeout=60)
        assert not list((raw / "out").glob("*_00001.h5"))  # nothing of the refused scan
    assert refused.refused == 480 and record.status == "complete"
    assert "scan 1 arrived before every node was ready: refused" in pipe.log("agg")
    assert_identical_to_offline(h5, raw / "offline.h5")


@pytest.mark.parametrize("restarted", ["writer host", "other node"])
def test_node_restarted_between_scans_takes_its_place(raw: Path, restarted: str):
    """A node killed between scans is noticed by its missing heartbeats; a new node started with the same
    command takes its place (a restarted writer host starts a new writer, and the other node follows it).
    The next scan is complete; the first scan's file is untouched."""
    with by_hand(raw, 2, node_timeout=2.0) as pipe:
        n0 = pipe.start_node("n0")
        wait_ready(pipe, 1)
        n1 = pipe.start_node("n1")
        wait_ready(pipe, 2)
        assert send(pipe, "--scan-number", "1").returncode == 0
        _, first = pipe.record(1, timeout=60)
        digest = sha(first)
        victim = n0 if restarted == "writer host" else n1
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        pipe.start_node("n2")
        deadline = time.monotonic() + 60
        while "takes the place of lost node" not in pipe.log("agg"):
            assert time.monotonic() < deadline, pipe.log("agg")[-3000:]
            time.sleep(0.1)
        if restarted == "writer host":
            while "hosting the scan writer" not in pipe.log("n2"):
                assert time.monotonic() < deadline, pipe.log("n2")[-3000:]
                time.sleep(0.1)
        sent = send(pipe, "--scan-number", "2")
        assert sent.returncode == 0, sent.stderr
        second, h5 = pipe.record(2, timeout=60)
    assert sha(first) == digest
    assert second.status == "complete"
    assert_identical_to_offline(h5, raw / "offline.h5")
