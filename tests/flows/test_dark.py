"""Dark references: a dark scan streamed through real aggregator and node processes is added up by the
nodes (streaming.accumulate_dark) into exactly the mean of the same frames computed directly; counting
with that dark through the streaming path equals `stemstream count --dark` with the file; darks are stored
with a timestamp, never overwritten, chosen newest-first by sessions, and bad input is one error line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from counting.dark import dark_reference, load_dark
from counting.dark.settings import DarkSettings
from counting.dark.stats import DarkSums, dark_from_sums
from counting.dark.store import list_darks, newest_dark, save_dark
from counting.geometry import FRAME_SHAPE, ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import read_counted_scan
from stemstream_testing.cli import Ran, as_process, in_process
from stemstream_testing.pipeline import ProcessPipeline
from stemstream_testing.support import CLI
from streaming.node.dark_sums import scan_sums
from tasks.darks import session_dark

pytestmark = pytest.mark.timeout(300)
SEED = 5  # the detector of the raw scan below (`stemstream simulate --seed 5`)


def run(cwd: Path, *args: str, process: bool = False) -> Ran:
    """`stemstream ARGS` in cwd with this environment's STEMSTREAM_ variables: in this process, or
    (process=True) as a real one."""
    env = {k: v for k, v in os.environ.items() if k.startswith("STEMSTREAM_")}
    return as_process(list(args), env, cwd=cwd) if process else in_process(list(args), env, cwd)


def blanked(shape: ScanShape) -> SimulatorConfig:
    """The simulated camera with the beam blanked: no electrons, no x-rays, only the detector's noise."""
    return SimulatorConfig(shape, dose=0.0, xray_rate=0.0, seed=SEED, flyback=False)


def test_streamed_dark_equals_the_direct_mean_and_counts_as_stemstream_count(tmp_path: Path) -> None:
    shape = ScanShape(8, 6)
    with ProcessPipeline(tmp_path / "dark", 2, streaming={"accumulate_dark": True}) as pipe:
        sent = pipe.send(blanked(shape), scan_number=3)
        assert sent.sent == 4 * shape.positions
        record, _ = pipe.record(3, timeout=120)
    assert record.complete_frames == shape.positions

    # The nodes' shares, added up, are the sums of exactly the frames the camera sent.
    found = scan_sums(pipe.out, 3)
    assert len(found.files) == 2 and found.sums.frames == shape.positions
    frames = [b.frames.copy() for b in SimulatedCamera(blanked(shape)).iter_batches(16)]
    direct = dark_reference(frames)

    made = run(tmp_path, "dark", "--scan-dir", str(pipe.out), "--scan", "3")
    assert made.returncode == 0, made.stderr
    line = made.stdout.strip().splitlines()[-1]
    assert line.startswith("dark: ") and f"({shape.positions} frames" in line
    path = Path(line.split()[1])
    assert path.parent == tmp_path / "stemstream-output" / "darks" and path.name.startswith("dark_")
    dark = np.load(path)
    assert dark.dtype == np.float32 and dark.shape == FRAME_SHAPE
    np.testing.assert_array_equal(dark, direct)  # bit for bit
    stats = json.loads(path.with_suffix(".json").read_text())
    assert stats["frames"] == shape.positions and stats["camera"] == "instrument"
    assert stats["source"].startswith("streamed scan 3 (2 node(s))")
    noise = np.load(path.with_suffix(".stats.npz"))["noise"]
    assert np.median(noise) == pytest.approx(2.4, rel=0.25)  # the simulator's read noise

    # Counting with it through the streaming path equals `stemstream count --dark` with that file.
    sim = run(
        tmp_path, "simulate", "--out", "raw", "--scan", "12x10", "--seed", str(SEED), "--dark-frames", "20"
    )
    assert sim.returncode == 0, sim.stderr
    offline = run(tmp_path, "count", "raw", "--dark", str(path), "--out", "offline.h5")
    assert offline.returncode == 0, offline.stderr
    with ProcessPipeline(tmp_path / "count", 2, counting={"dark": str(path)}) as pipe:
        pipe.send(sorted((tmp_path / "raw").glob("*.data")), scan_number=1)
        record, h5 = pipe.record(1, timeout=120)
    assert record.status == "complete"
    streamed, counted = read_counted_scan(h5), read_counted_scan(tmp_path / "offline.h5")
    assert streamed.num_events > 0
    for a, b in zip(streamed.events.ravel(), counted.events.ravel(), strict=True):
        np.testing.assert_array_equal(a, b)
    ours, theirs = streamed.metadata["electron_counting"], counted.metadata["electron_counting"]
    assert ours["background_threshold"] == theirs["background_threshold"]


def test_dark_statistics_and_hot_pixels() -> None:
    rng = np.random.default_rng(1)
    frames = (20 + 2 * rng.standard_normal((30, *FRAME_SHAPE))).round().astype(np.uint16)
    frames[:, 100, 200] = 900  # a hot pixel
    sums = DarkSums()
    sums.add(frames[:10])
    sums.merge(DarkSums()).add(frames[10:])  # sums add up across batches and nodes
    ref = dark_from_sums(sums)
    np.testing.assert_array_equal(ref.mean, dark_reference(frames))
    np.testing.assert_allclose(ref.noise, frames.std(axis=0), rtol=1e-5, atol=1e-5)
    assert ref.hot[100, 200] and ref.stats["hot_pixels"] == 1
    assert ref.stats["noise"] == pytest.approx(2.0, rel=0.1)


def test_darks_are_timestamped_never_overwritten_and_sessions_take_the_newest(tmp_path: Path) -> None:
    ref = dark_from_sums(DarkSums(np.full(FRAME_SHAPE, 20.0), np.full(FRAME_SHAPE, 404.0), 1))
    settings = DarkSettings(dir=tmp_path / "darks", max_age_hours=2)
    now = time.time()
    old = save_dark(settings.dir, ref, "instrument", "test", created=now - 3 * 3600)
    same_second = [save_dark(settings.dir, ref, "simulated:0", "test", created=now) for _ in range(2)]
    assert len({Path(d.path).name for d in same_second}) == 2  # a numbered variant, nothing replaced
    assert [d.path for d in list_darks(settings.dir)] == [old.path, *(d.path for d in same_second)]
    assert newest_dark(settings.dir, "instrument").path == old.path
    assert np.array_equal(load_dark(old.path), ref.mean)

    chosen, warning = session_dark(None, settings, tmp_path, "instrument")
    assert chosen == Path(old.path) and "3.0 h old" in warning and "dark.max_age_hours = 2" in warning
    chosen, warning = session_dark(None, settings, tmp_path, "simulated:0")
    assert chosen == Path(same_second[-1].path) and warning is None
    explicit = tmp_path / "mine.npy"
    assert session_dark(explicit, settings, tmp_path, "instrument") == (explicit, None)  # counting.dark wins
    assert session_dark(None, settings.model_copy(update={"use_newest": False}), tmp_path, "instrument") == (
        None,
        None,
    )
    assert session_dark(None, settings, tmp_path, "simulated:7") == (None, None)  # another detector's darks


def test_a_dark_is_stored_where_the_file_system_has_no_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H3 for darks: without hard links the complete dark takes its name by a no-replace rename; nothing is
    left under a temporary name, and a second dark in the same second is a numbered variant."""

    def no_links(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(dst))

    monkeypatch.setattr(os, "link", no_links)
    ref = dark_from_sums(DarkSums(np.full(FRAME_SHAPE, 20.0), np.full(FRAME_SHAPE, 404.0), 1))
    now = time.time()
    first, second = (save_dark(tmp_path, ref, "instrument", "test", created=now) for _ in range(2))
    assert first.path != second.path
    assert [d.path for d in list_darks(tmp_path)] == [first.path, second.path]
    assert np.array_equal(load_dark(second.path), ref.mean)
    assert not list(tmp_path.glob(".*partial"))


def test_dark_command_bad_input_is_one_error_line(tmp_path: Path) -> None:
    for args, message in [
        (["dark"], "give exactly one of --simulated, --session, --scan-dir DIR or RAW files"),
        (["dark", "--simulated", "--set", "a.b=1"], "--set is for --session"),
        (["dark", "nothere.data"], "raw file nothere.data does not exist"),
        (["dark", "--scan-dir", "nothere"], "scans directory nothere does not exist"),
        (["dark", "--scan-dir", "."], "no dark sums of any scan"),
        (["dark", "--scan", "2", "--simulated"], "--scan needs --scan-dir"),
    ]:
        done = run(tmp_path, *args, process=args == ["dark"])  # one as a real process: the entry point
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, done.stderr)
    assert not (tmp_path / "stemstream-output" / "darks").exists()


def test_simulated_dark_command(tmp_path: Path) -> None:
    done = run(tmp_path, "dark", "--simulated", "--frames", "20")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.split()[1])
    camera = SimulatedCamera(SimulatorConfig(ScanShape(1, 1), seed=0))
    np.testing.assert_array_equal(np.load(path), dark_reference(camera.dark_frames(20)))
    listed = run(tmp_path, "dark", "--list")
    assert listed.returncode == 0 and path.name in listed.stdout and "simulated:0" in listed.stdout


@pytest.mark.timeout(420)
def test_dark_session_takes_the_next_scan_the_receivers_deliver(tmp_path: Path) -> None:
    """`stemstream dark --session`: an instrument session for one scan, the nodes adding up its raw frames;
    the camera (here four sender threads, beam blanked) is independent of it, as on the microscope."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from stemstream_testing.support import free_port
    from streaming.camera.sender import run_sender

    recv, nodes, monitor = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    (tmp_path / "none.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEMSTREAM_", "PREFECT_"))}
    env |= {
        "STEMSTREAM_OUTPUT_DIR": str(tmp_path / "out"),
        "STEMSTREAM_CONFIG": str(tmp_path / "none.toml"),
        "STEMSTREAM_STREAMING__NODES_BIND": nodes,
        "STEMSTREAM_STREAMING__MONITOR_BIND": monitor,
        "STEMSTREAM_STREAMING__SCAN_DEADLINE": "3",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        # the embedded server starts beside the parallel test workers: a loaded 2-core machine needs more than 90 s
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",
    }
    args = [*CLI, "dark", "--session", "--set", f'streaming.receivers=["{recv}"]', "--set", "session.nodes=2"]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 200  # the embedded Prefect server and two nodes, on a loaded machine
        while not any(line.startswith("ready: receivers") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "\n".join(lines[-30:])
            time.sleep(0.1)
        shape = ScanShape(10, 4)
        cameras = [SimulatedCamera(blanked(shape)) for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            sent = list(
                pool.map(
                    lambda m: run_sender(cameras[m], [recv], m, scan_number=9, send_timeout=60), range(4)
                )
            )
        assert sum(r.sent for r in sent) == 4 * shape.positions
        assert proc.wait(180) == 0, "\n".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(5)
    dark_line = next(line for line in lines if line.startswith("dark: "))
    assert f"({shape.positions} frames" in dark_line and "streamed scan 9 (2 node(s))" in dark_line
    frames = [b.frames.copy() for b in SimulatedCamera(blanked(shape)).iter_batches(16)]
    np.testing.assert_array_equal(np.load(dark_line.split()[1]), dark_reference(frames))
