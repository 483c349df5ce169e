"""The README's streaming-by-hand procedure, as processes: the aggregator, N nodes all started with the same
command and the sender, from the command line. One file per scan, identical to `stemstream count` on the
same raw files, whatever a user starts: nodes that cannot join get a clear error, nothing is replaced."""

from __future__ import annotations

import hashlib
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
pytestmark = pytest.mark.timeout(300)


class Hand:
    """Processes started by hand in one directory, all stopped at the end."""

    def __init__(self, cwd: Path, n_nodes: int, **aggregator_env: str) -> None:
        self.cwd = cwd
        self.procs: list[subprocess.Popen] = []
        self.recv, self.nodes, self.mon = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
        env = {f"STEMSTREAM_STREAMING__{k.upper()}": v for k, v in aggregator_env.items()}
        self.aggregator = self.start(
            "agg",
            ["aggregator", "--receivers", self.recv, "--nodes-bind", self.nodes, "--nodes", str(n_nodes)]
            + ["--monitor-bind", self.mon],
            env,
        )

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.cwd / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                [*CLI, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        self.procs.append(proc)
        return proc

    def node(self, name: str, output_dir: str = "out") -> subprocess.Popen:
        """`stemstream node`: the same command for every node (only the log file differs)."""
        args = ["node", "--aggregator", self.nodes, "--output-dir", output_dir, "--dark", "raw/dark.npy"]
        return self.start(name, args + ["--workers", "0"])

    def send(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CLI, "send", "--aggregator", self.recv, "--raw", "raw", "--timeout", "120", *extra],
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def log(self, name: str) -> str:
        return (self.cwd / f"{name}.log").read_text(errors="replace")

    def wait_for_records(self, n: int, timeout: float = 60) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = sorted((self.cwd / "out").glob("FOURD_*.json"))
            if len(records) >= n:
                return records
            time.sleep(0.1)
        raise AssertionError(f"{n} scan(s) not written: {self.log('agg')[-3000:]}")

    def wait_ready(self, n: int, timeout: float = 60) -> None:
        """Until the aggregator log says n nodes joined and the writer is known."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log("agg")
            if (
                text.count(" joined as index ") + text.count(" rejoined as index ") >= n
                and "scan writer of" in text
            ):
                return
            time.sleep(0.1)
        raise AssertionError(self.log("agg")[-3000:])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    sim = subprocess.run(
        [*CLI, "simulate", "--out", "raw", "--scan", "12x10", "--seed", "5", "--dark-frames", "20"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sim.returncode == 0, sim.stderr
    count = subprocess.run(
        [*CLI, "count", "raw", "--dark", "raw/dark.npy", "--out", "offline.h5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert count.returncode == 0, count.stderr
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
    hand = Hand(raw, n_nodes)
    try:
        for i in range(n_nodes):
            hand.node(f"n{i}")
        send = hand.send()
        assert send.returncode == 0, send.stderr
        assert "sent 480 sectors" in send.stdout
        records = hand.wait_for_records(1)
        time.sleep(1.0)  # a second writer, if there were one, would write now
    finally:
        hand.stop()
    assert len(records) == 1 and len(list((raw / "out").glob("*.h5"))) == 1
    record = json.loads(records[0].read_text())
    assert record["status"] == "complete" and record["frames_written"] == 120 and record["nodes"] == n_nodes
    assert_identical_to_offline(records[0].with_suffix(".h5"), raw / "offline.h5")
    hosts = [i for i in range(n_nodes) if "hosting the scan writer" in hand.log(f"n{i}")]
    assert len(hosts) == 1  # exactly one writer, chosen by the aggregator


def test_nodes_that_cannot_join_get_a_clear_error_and_nothing_is_replaced(raw: Path):
    """Another --output-dir, and one node more than --nodes: each exits 1 with the reason; the session's
    nodes go on and the scan is complete."""
    hand = Hand(raw, 2)
    try:
        hand.node("n0")
        hand.wait_ready(1)
        elsewhere = hand.node("elsewhere", output_dir="other")
        assert elsewhere.wait(60) == 1
        hand.node("n1")
        hand.wait_ready(2)
        extra = hand.node("extra")
        assert extra.wait(60) == 1
        send = hand.send()
        assert send.returncode == 0, send.stderr
        records = hand.wait_for_records(1)
    finally:
        hand.stop()
    last = hand.log("elsewhere").strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused by the aggregator" in last
    assert "was started with --output-dir other, but this session's scans go to out" in last
    assert "Traceback" not in hand.log("elsewhere")
    assert not (raw / "other").exists() or not list((raw / "other").glob("*.h5"))
    last = hand.log("extra").strip().splitlines()[-1]
    assert last.startswith("error: ") and "all 2 node slots are taken" in last
    assert_identical_to_offline(records[0].with_suffix(".h5"), raw / "offline.h5")


def test_node_started_after_the_scan_began_completes_it(raw: Path):
    """The camera starts while only one of two nodes runs: the aggregator holds the scan (the senders wait)
    until every node is armed, so the late node loses nothing."""
    hand = Hand(raw, 2)
    try:
        hand.node("n0")
        hand.wait_ready(1)
        sender = subprocess.Popen(
            [*CLI, "send", "--aggregator", hand.recv, "--raw", "raw", "--timeout", "120"],
            cwd=raw,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        assert sender.poll() is None  # waiting for the aggregator, not failed
        hand.node("n1")
        out, err = sender.communicate(timeout=180)
        assert sender.returncode == 0, err
        records = hand.wait_for_records(1)
    finally:
        hand.stop()
    assert_identical_to_offline(records[0].with_suffix(".h5"), raw / "offline.h5")


@pytest.mark.parametrize("restarted", ["writer host", "other node"])
def test_node_restarted_between_scans_takes_its_place(raw: Path, restarted: str):
    """A node killed between scans is noticed by its missing heartbeats; a new node started with the same
    command takes its place (a restarted writer host starts a new writer, and the other node follows it).
    The next scan is complete; the first scan's file is untouched."""
    hand = Hand(raw, 2, node_timeout="2")
    try:
        n0 = hand.node("n0")
        hand.wait_ready(1)
        n1 = hand.node("n1")
        hand.wait_ready(2)
        assert hand.send("--scan-number", "1").returncode == 0
        first = hand.wait_for_records(1)[0]
        digest = sha(first.with_suffix(".h5"))
        victim = n0 if restarted == "writer host" else n1
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        hand.node("n2")
        deadline = time.monotonic() + 60
        while "takes the place of lost node" not in hand.log("agg"):
            assert time.monotonic() < deadline, hand.log("agg")[-3000:]
            time.sleep(0.1)
        if restarted == "writer host":
            while "hosting the scan writer" not in hand.log("n2"):
                assert time.monotonic() < deadline, hand.log("n2")[-3000:]
                time.sleep(0.1)
        send = hand.send("--scan-number", "2")
        assert send.returncode == 0, send.stderr
        records = hand.wait_for_records(2)
    finally:
        hand.stop()
    assert sha(first.with_suffix(".h5")) == digest
    second = next(r for r in records if r.name.endswith("_00002.json"))
    assert json.loads(second.read_text())["status"] == "complete"
    assert_identical_to_offline(second.with_suffix(".h5"), raw / "offline.h5")
