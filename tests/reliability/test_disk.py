"""Storage faults: a full disk or an unwritable output directory fails the writer's node clearly and at once,
leaves no partial file, and never hangs.

A full disk is stood in for by RLIMIT_FSIZE (unprivileged, no mount): CPython ignores SIGXFSZ, so a write
past the limit fails with EFBIG "File too large", exactly where ENOSPC or EDQUOT would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import zmq

from counting.geometry import ALL_SECTORS, ScanShape
from counting.kernel import Thresholds
from counting.pipeline import count_batches
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import counted_scan_image
from stemstream_testing.options import estimation, options
from stemstream_testing.support import CLI, free_port
from streaming.aggregator.aggregator import Aggregator
from streaming.camera.sender import run_sender
from streaming.components import node_config
from streaming.node.streamer import NodeStreamer
from streaming.protocol import control as p
from streaming.writer.writer import ScanWriter, ScanWriterError, WriterConfig
from tests.streaming.harness import counting_settings, stream_settings

pytestmark = pytest.mark.timeout(180)
FIXED = Thresholds(30.5, 600.0)
# Above every small file the node writes (probe, stop record, a numba cache file), below the scan's HDF5.
FSIZE_LIMIT = 256 * 1024
# Set the limit, then become the CLI: exec keeps the limit, and unlike preexec_fn this is safe while the
# test process runs threads (the aggregator, the senders).
LIMITED = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1]))); "
    "os.execv(sys.executable, [sys.executable, '-m', 'flows.cli', *sys.argv[2:]])"
)


def session_processes(sid: int) -> list[int]:
    """PIDs still running in session ``sid`` (a node started with start_new_session: its workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rfind(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM its session, then SIGKILL; bounded."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    for pid in session_processes(proc.pid):  # workers left behind: the test fails, but cleans up
        os.kill(pid, signal.SIGKILL)


def leftovers(directory: Path) -> list[str]:
    """Everything in the directory but stop records and the scan-id state: scan files, temporaries, probes."""
    return sorted(f.name for f in directory.iterdir() if f.suffix != ".json" and f.name != ".stemstream")


def test_disk_full_mid_session_stops_the_node_at_once_and_leaves_no_partial_file(tmp_path: Path):
    config = SimulatorConfig(ScanShape(32, 32), dose=200.0, seed=31)
    cam = SimulatedCamera(config)
    offline = count_batches(cam.iter_batches(64), cam.scan, None, options(fixed=FIXED))
    # The premise: only the scan's HDF5 exceeds the limit (this also warms the numba cache).
    assert len(counted_scan_image(offline)) > 2 * FSIZE_LIMIT
    out = tmp_path / "out"
    agg = Aggregator(stream_settings(n_nodes=1))
    stop_agg = threading.Event()
    agg_thread = threading.Thread(target=agg.run, kwargs={"stop_event": stop_agg}, daemon=True)
    agg_thread.start()
    node = subprocess.Popen(
        [sys.executable, "-c", LIMITED, str(FSIZE_LIMIT), "node", "--aggregator", agg.nodes_endpoint]
        + ["--output-dir", str(out), "--workers", "0", "--name", "n0"]
        + ["--background-threshold", str(FIXED.background), "--xray-threshold", str(FIXED.xray)],
        stdout=subprocess.PIPE,  # a pipe: a log file would be size-limited too
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(node.stdout.read()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while agg.state().nodes_ready < 1:
            assert node.poll() is None, f"node exited early with {node.returncode}"
            assert time.monotonic() < deadline, "node did not become ready"
            time.sleep(0.05)
        cams = [SimulatedCamera(config) for _ in range(4)]

        def send(module: int) -> int:
            return run_sender(
                cams[module], agg.receiver_endpoints, module, scan_number=1, send_timeout=30
            ).sent

        with ThreadPoolExecutor(4) as ex:  # the four modules start together, as in the harness
            sent = list(ex.map(send, range(4)))
        assert sum(sent) == 4 * 1024
        code = node.wait(60)  # the scan ends 1 s after its last sector, then the write fails
        exited = datetime.now()
        reader.join(10)
    finally:
        stop_process(node)
        stop_agg.set()
        agg_thread.join(20)
    assert not agg_thread.is_alive()
    text = b"".join(chunks).decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    reason = f"cannot write scan 1 to {out}: [Errno 27] File too large"
    assert code == 1, text[-3000:]
    assert lines[-1] == f"error: scan writer failed: {reason}", text[-3000:]
    assert "Traceback" not in text
    logged = next(line for line in lines if reason in line)
    failed_at = datetime.strptime(logged[:23], "%Y-%m-%d %H:%M:%S,%f")
    assert (exited - failed_at).total_seconds() < 5, "the node did not stop promptly"
    assert leftovers(out) == []  # no scan file, no temporary, no probe
    records = list(out.glob("*_00001.json"))
    assert len(records) == 1, sorted(os.listdir(out))
    record = json.loads(records[0].read_text())
    assert record["status"] == "failed" and record["path"] is None and record["error"] == reason
    assert record["sha256"] is None and record["frames_written"] == 1024
    assert session_processes(node.pid) == []


def test_unwritable_output_directory_fails_the_node_at_start(tmp_path: Path):
    (tmp_path / "file").write_text("a regular file")
    out = tmp_path / "file" / "out"
    t0 = time.monotonic()
    node = subprocess.Popen(
        [*CLI, "node", "--aggregator", f"tcp://127.0.0.1:{free_port()}", "--output-dir", str(out)]
        + ["--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        stdout, stderr = node.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        stop_process(node)
    assert node.returncode == 1
    assert stderr.decode().strip().splitlines()[-1] == (
        f"error: scan output directory {out} is not writable: [Errno 20] Not a directory: '{out}'"
    )
    assert b"Traceback" not in stdout + stderr
    assert elapsed < 20  # Python's start and imports; nothing waits
    assert session_processes(node.pid) == []  # no counting worker was started
    assert (tmp_path / "file").read_text() == "a regular file"


def test_node_with_an_unwritable_output_directory_starts_nothing(tmp_path: Path):
    (tmp_path / "out").write_text("not a directory")
    config = node_config(
        stream_settings(node_workers=2),
        counting_settings(),
        aggregator="tcp://127.0.0.1:9",
        output_dir=tmp_path / "out",
    )
    children = set(multiprocessing.active_children())
    with pytest.raises(ScanWriterError) as err:
        NodeStreamer(config, None)
    assert str(err.value) == (
        f"scan output directory {tmp_path / 'out'} is not writable: "
        f"[Errno 17] File exists: '{tmp_path / 'out'}'"
    )
    assert [t.name for t in threading.enumerate() if t.name == "stemstream-writer"] == []
    assert set(multiprocessing.active_children()) == children  # no counting worker was started


def write_one_scan(out: Path, template: str) -> ScanWriter:
    """A writer that gets one tiny scan (2x2, fixed thresholds) from one node; returns it stopped."""
    config = WriterConfig(out, 0, template, "America/Los_Angeles", FIXED, estimation(), 30.0)
    writer = ScanWriter("tcp://127.0.0.1:0", config, None).start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(writer.endpoint)
        sock.send_multipart(p.encode(p.NodeScanBegin("n0", 1, 2, 2, 1, 0)))
        events = [np.arange(k, dtype=np.uint32) * 1000 for k in (3, 0, 5, 1)]
        sock.send_multipart(
            [
                *p.encode(p.EventsHeader("n0", 1, 4)),
                np.arange(4, dtype=np.int64),
                np.arange(4, dtype=np.int64),
                np.full(4, ALL_SECTORS, np.uint8),
                np.cumsum([0] + [len(e) for e in events]).astype(np.int64),
                np.concatenate(events),
            ]
        )
        sock.send_multipart(p.encode(p.NodeScanDone("n0", 1, 16, 16, 4, 0, 0, "end")))
        deadline = time.monotonic() + 20
        while not writer.records and writer.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sock.close()
        ctx.term()
        writer.stop(timeout=20)
    return writer


def test_writer_that_cannot_store_a_scan_records_why_and_leaves_no_partial_file(tmp_path: Path):
    """The scan's temporary name is too long for the file system (a real OS error, in-process); the final
    name and its stop record still fit."""
    out = tmp_path / "out"
    template = "x" * 234 + "_{scan:05d}.h5"
    writer = write_one_scan(out, template)
    reason = f"cannot write scan 1 to {out}: [Errno 36] File name too long"
    assert writer.error is not None and writer.error.startswith(reason)
    stem = "x" * 234 + "_00001"
    assert leftovers(out) == [] and [f.name for f in out.glob("*.json")] == [f"{stem}.json"]
    record = json.loads((out / f"{stem}.json").read_text())
    assert record["status"] == "failed" and record["error"] == writer.error and record["path"] is None
    assert [r.status for r in writer.records] == ["failed"]


def test_writer_never_overwrites_an_existing_file(tmp_path: Path):
    """A scan whose file name is taken (a scan number that came again, a file put there by hand) is written
    under a numbered variant; what was there is untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan_00001.h5").write_text("kept")
    writer = write_one_scan(out, "scan_{scan:05d}.h5")
    assert writer.error is None
    assert (out / "scan_00001.h5").read_text() == "kept"
    assert sorted(f.name for f in out.glob("scan_*")) == [
        "scan_00001-1.h5",
        "scan_00001-1.json",
        "scan_00001.h5",
    ]
    assert [r.path for r in writer.records] == [str(out / "scan_00001-1.h5")]


def test_hdf5_write_on_a_full_disk_raises_oserror_and_exits_cleanly(tmp_path: Path):
    """write_counted_scan past the limit: a plain OSError, nothing left, and no crash at exit (HDF5 writing
    to disk itself raises RuntimeError here and can crash the interpreter at exit)."""
    code = f"""
import errno, os, resource, sys
import numpy as np
from counting.geometry import ScanShape
from counting.kernel import EventList
from counting.sparse import ScanAccumulator, write_counted_scan
shape = ScanShape(16, 16)
rng = np.random.default_rng(0)
events = [rng.integers(0, 576 * 576, 300).astype(np.uint32) for _ in range(shape.positions)]
acc = ScanAccumulator(shape)
acc.add(np.arange(256), np.arange(256), np.full(256, 15, np.uint8),
        EventList(np.concatenate(events), np.arange(257, dtype=np.int64) * 300))
scan = acc.finish({{"stemstream": {{"scan_number": 1}}}})
resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, {FSIZE_LIMIT}))
try:
    write_counted_scan(sys.argv[1], scan)
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
    print("EFBIG")
"""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out / "scan.h5")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "EFBIG"
    assert os.listdir(out) == []
