"""Audit findings on what a session trusts: the nodes' settings file is checked against the digest the
session rendered into their commands (L2), the catalogue's pending file is a journal that survives a
SIGKILL and replays idempotently (L3), the counted-data tap is CURVE-only off loopback and on its own
context (L4), and a microscope sidecar cannot pull another file into the scan file (L9).

Real files, real processes (the CLI, a SIGKILLed recorder) and real ZeroMQ sockets on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from catalogue import Catalogue
from catalogue.entries import SessionEntry
from catalogue.journal import read_pending
from catalogue.rebuild import rebuild
from catalogue.recorder import PENDING_NAME, Recorder
from counting.microscope_meta import MicroscopeMetadataError
from counting.storage.durable import file_sha256
from stemstream_testing.catalogue_scans import write_scan
from stemstream_testing.support import free_port
from streaming.live.hooks import LiveNode
from streaming.live.tap import LiveTap
from streaming.protocol import live as live_wire
from streaming.settings import LiveSettings
from streaming.transport.security import CurveClientConfig, load_keypair, write_keypair
from tasks.microscope import read_microscope_file
from tasks.settings import MicroscopeSettings

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """The environment of a child process: this repository importable, no settings from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMSTREAM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ------------------------------------------------------------------------------- L2 the settings file
@pytest.fixture(scope="module")
def nersc_plan(tmp_path_factory: pytest.TempPathFactory):
    """A NERSC session's plan: its settings file written into the scan directory, as the nodes read it."""
    from flows.session_setup import session_plan
    from flows.settings import Settings

    root = tmp_path_factory.mktemp("nersc")
    settings = Settings(session={"backend": "nersc", "scan_dir": root / "scans"}, counting={"dark": None})
    return session_plan(settings, root / "session")


def test_the_plan_renders_the_settings_digest_and_keeps_the_file_private(nersc_plan) -> None:
    from tasks.launch.plan import aggregator_command, node_command, view_command
    from tasks.nersc.batch import render_batch_script
    from tasks.settings import SlurmSettings

    plan = nersc_plan
    digest = file_sha256(plan.settings_file)
    assert plan.settings_file.parent.name == ".stemstream" and plan.settings_sha256 == digest
    assert plan.settings_file.parent.stat().st_mode & 0o777 == 0o700
    assert plan.settings_file.stat().st_mode & 0o777 == 0o600
    for argv in (node_command(plan), aggregator_command(plan), view_command(plan)):
        i = argv.index("--settings-sha256")
        assert argv[i + 1] == digest and argv[argv.index("--settings") + 1] == str(plan.settings_file)
    script = render_batch_script(SlurmSettings(account="m0000"), node_command(plan))
    assert f"--settings-sha256 {digest}" in script


def test_a_settings_file_changed_after_the_session_wrote_it_is_refused(nersc_plan, tmp_path: Path) -> None:
    from tasks.launch.plan import CLI, node_command, settings_options

    plan = nersc_plan
    ok = subprocess.run(  # the file as written: accepted (then `info` fails on its own argument)
        [*CLI, *settings_options(plan), "info", str(tmp_path / "none.h5")],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 1 and "does not match" not in ok.stderr + ok.stdout
    original = plan.settings_file.read_text()
    swapped = json.loads(original)
    swapped["output_dir"] = "/elsewhere/evil-marker"  # what a swap would change: where and how it counts
    try:
        plan.settings_file.write_text(json.dumps(swapped))
        run = subprocess.run(  # the node command exactly as the batch script runs it
            node_command(plan), capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=60
        )
    finally:
        plan.settings_file.write_text(original)
    out = run.stderr + run.stdout
    assert run.returncode == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and str(plan.settings_file) in lines[0] and "--settings-sha256" in lines[0]
    assert "evil-marker" not in out and "Traceback" not in out  # never the file's contents


# ----------------------------------------------------------------------- L3 the catalogue's pending file
_QUEUE_AND_WAIT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from catalogue.database import CatalogueUnavailable
    from catalogue.entries import ScanEntry, SessionEntry
    from catalogue.recorder import Recorder

    def down():
        raise CatalogueUnavailable("catalogue unavailable: the test's database is down")

    recorder = Recorder(down, Path(sys.argv[1]), retry_every=60)
    scan = ScanEntry.from_stop_record(Path(sys.argv[2]))
    recorder.session(SessionEntry("run-k", 5))
    recorder.scan(ScanEntry(scan.record, session_key="run-k", verified=True))
    recorder.analysis(scan.uid, {"p": 1}, {"r": 2}, kind="session")
    print("queued", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture(scope="module")
def scan_record(tmp_path_factory: pytest.TempPathFactory):
    """One small counted scan and its stop record."""
    return write_scan(tmp_path_factory.mktemp("scan") / "scans", 3, 3, seed=3)


def test_a_recorder_killed_after_queueing_leaves_a_pending_file_replayed_once(
    scan_record, tmp_path: Path
) -> None:
    session_dir = tmp_path / "sessions" / "run-k"
    scans = session_dir / "scans"
    scans.mkdir(parents=True)
    for f in Path(scan_record.path).parent.iterdir():
        shutil.copy2(f, scans / f.name)
    stop_record = next(scans.glob("*.json"))
    pending = session_dir / PENDING_NAME
    child = subprocess.Popen(
        [sys.executable, "-c", _QUEUE_AND_WAIT, str(pending), str(stop_record)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "queued", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    entries = read_pending(pending)
    assert [kind for kind, _ in entries] == ["session", "scan", "analysis"]
    assert len(entries[2][1]["uid"]) == 32
    kept = pending.read_bytes()
    with Catalogue.open(f"sqlite:///{tmp_path / 'cat.sqlite'}") as cat:
        first = rebuild(cat, tmp_path)
        pending.write_bytes(kept)  # as if the first replay had stopped before marking the file replayed
        again = rebuild(cat, tmp_path)
        assert (first.pending_entries, again.pending_entries) == (3, 3)
        scan = cat.find_scan(scan_record.scan_uuid)
        assert (scan.session, scan.verified, len(scan.analyses)) == ("run-k", True, 1)


def test_an_entry_the_database_refuses_is_kept_as_pending(scan_record, tmp_path: Path, caplog) -> None:
    url = f"sqlite:///{tmp_path / 'cat.sqlite'}"
    pending = tmp_path / PENDING_NAME
    pending.write_text("[]")  # an earlier file: never replaced
    recorder = Recorder(lambda: Catalogue.open(url), pending)
    recorder.session(SessionEntry("run-r", 6))
    recorder.analysis("0" * 32, {"p": 1}, {"r": 2})  # no such scan: refused, not an outage
    report = recorder.close(timeout=30)
    assert (report.recorded, report.pending) == (1, 1)
    assert pending.read_text() == "[]" and report.pending_file == str(tmp_path / "catalogue-pending-1.json")
    [(kind, data)] = read_pending(Path(report.pending_file))
    assert kind == "analysis" and data["scan"] == "0" * 32
    assert "kept as pending" in caplog.text
    clean = Recorder(lambda: Catalogue.open(url), tmp_path / "clean" / PENDING_NAME)
    clean.session(SessionEntry("run-c", 7))
    assert clean.close(timeout=30).pending_file is None  # all recorded: the journal is set aside
    assert [p.name for p in (tmp_path / "clean").iterdir()] == ["catalogue-pending.recorded.json"]


def test_a_pending_file_cut_short_by_a_crash_is_read_up_to_its_last_whole_line(tmp_path: Path) -> None:
    pending = tmp_path / PENDING_NAME
    lines = [{"seq": 1, "kind": "end", "data": {"key": "a", "state": "failed"}}, {"done": 1}]
    lines += [{"seq": 2, "kind": "end", "data": {"key": "b", "state": "failed"}}]
    pending.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"seq": 3, "kind": "en')
    assert read_pending(pending) == [("end", {"key": "b", "state": "failed"})]


# --------------------------------------------------------------------------------------------- L4 tap
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Key files: the aggregator's, the nodes' (shared), a listed subscriber's and a stranger's."""
    d = tmp_path_factory.mktemp("keys")
    return {name: write_keypair(d, name)[1] for name in ("server", "node", "subscriber", "stranger")}


def _node_curve(keys: dict[str, Path]) -> CurveClientConfig:
    return CurveClientConfig.from_files(keys["node"], keys["server"].with_suffix(".key"))


def test_a_tap_off_loopback_without_keys_is_refused_and_the_node_goes_on(caplog) -> None:
    live = LiveSettings(enabled=False, tap=True, tap_host="0.0.0.0")
    node = LiveNode(zmq.Context.instance(), "node-x", live, "tcp://127.0.0.1:1", None)
    try:
        assert "live.tap_host 0.0.0.0 is not loopback" in node.tap.refused
        assert "no CURVE keys" in node.tap.refused and node.tap.refused in caplog.text
        assert node.tap_refused == node.tap.refused and caplog.text.count("no CURVE keys") == 1
        node.welcome(0)  # never binds
        assert node.tap.socket is None and node.tap.address == ""
        events = SimpleNamespace(offsets=np.zeros(2, np.int64), indices=np.zeros(0, np.uint32))
        node.tap.batch(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.uint8), events)
    finally:
        node.close()


def test_a_tap_off_loopback_with_keys_serves_curve(keys: dict[str, Path]) -> None:
    tap = LiveTap("node-y", LiveSettings(tap=True, tap_host="0.0.0.0"), _node_curve(keys))
    try:
        assert tap.refused is None and tap._curve is not None  # never bound here: loopback only in tests
        assert tap._ctx is not zmq.Context.instance()
    finally:
        tap.close()


def _sub(ctx: zmq.Context, port: int, keys: dict[str, Path], who: str | None) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if who is not None:
        public, secret = load_keypair(keys[who])
        sock.curve_secretkey = secret.get_secret_value().encode()
        sock.curve_publickey = public.encode()
        sock.curve_serverkey = load_keypair(keys["node"])[0].encode()
    sock.setsockopt(zmq.SUBSCRIBE, b"tap.")
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def test_a_curve_tap_reaches_listed_subscribers_only(keys: dict[str, Path]) -> None:
    port = free_port()
    live = LiveSettings(
        tap=True, tap_curve=True, tap_port=port, tap_clients=[keys["subscriber"].with_suffix(".key")]
    )
    tap = LiveTap("node-z", live, _node_curve(keys))
    ctx = zmq.Context()
    try:
        tap.welcome(0)
        assert tap.socket is not None and tap.refused is None
        subs = {who: _sub(ctx, port, keys, who) for who in ("subscriber", "node", "stranger", None)}
        events = SimpleNamespace(offsets=np.array([0, 2], np.int64), indices=np.array([5, 9], np.uint32))
        got: dict[object, list] = {who: [] for who in subs}
        deadline = time.monotonic() + 20
        settle = None  # once the listed subscribers have data: publish a while longer for the others
        while time.monotonic() < (settle or deadline):
            tap.batch(np.array([4], np.int64), np.array([7], np.int64), np.array([15], np.uint8), events)
            for who, sock in subs.items():
                while sock.poll(0):
                    got[who].append(live_wire.decode(sock.recv_multipart()))
            if settle is None and got["subscriber"] and got["node"]:
                settle = time.monotonic() + 1.0
            time.sleep(0.02)
        kind, header, arrays = got["subscriber"][0]
        assert kind == live_wire.TAP_EVENTS and header["frames"] == 1
        assert list(arrays["indices"]) == [5, 9] and list(arrays["positions"]) == [4]
        assert got[None] == [] and got["stranger"] == []  # plaintext, or a key not listed: nothing
    finally:
        for sock in locals().get("subs", {}).values():
            sock.close(linger=0)
        ctx.term()
        tap.close()


def test_a_subscription_flood_never_reaches_the_node_and_is_never_installed() -> None:
    """bench_hostile_memory's finding: thousands of distinct subscriptions (and an oversize one) from local
    processes stalled a plain PUB's sender, the node's counting thread, for seconds. The node only queues;
    the tap's thread installs only subscriptions a tap message can match and counts the rest; a real
    subscriber gets every batch."""
    port = free_port()
    tap = LiveTap("node-f", LiveSettings(tap=True, tap_port=port))
    ctx = zmq.Context()
    flooders, floods = [], 1000  # a SUB queues at most SNDHWM (1000) subscriptions for a new peer
    try:
        tap.welcome(0)
        good = ctx.socket(zmq.SUB)
        good.setsockopt(zmq.SUBSCRIBE, b"tap.")
        good.connect(f"tcp://127.0.0.1:{port}")
        for k in range(3):
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            for n in range(floods):
                sock.setsockopt(zmq.SUBSCRIBE, f"flood-{k}-{n}".encode())
            sock.connect(f"tcp://127.0.0.1:{port}")
            flooders.append(sock)
        big = ctx.socket(zmq.SUB)  # beyond the tap's 1 kB message limit: disconnected by ZeroMQ
        big.setsockopt(zmq.SUBSCRIBE, b"t" * 2048)
        big.connect(f"tcp://127.0.0.1:{port}")
        flooders.append(big)
        events = SimpleNamespace(offsets=np.array([0, 1], np.int64), indices=np.array([3], np.uint32))
        got, calls, deadline = [], 0, time.monotonic() + 30
        while (len(got) < 50 or tap.refused_subscriptions < 3 * floods) and time.monotonic() < deadline:
            tap.batch(
                np.array([calls], np.int64), np.array([calls], np.int64), np.array([15], np.uint8), events
            )
            calls += 1
            while good.poll(0):
                got.append(live_wire.decode(good.recv_multipart()))
            time.sleep(0.005)
        assert tap.refused_subscriptions >= 3 * floods, tap.refused_subscriptions
        assert len(got) >= 50 and all(kind == live_wire.TAP_EVENTS for kind, _, _ in got)
        seqs = [header["seq"] for _, header, _ in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert tap._thread is not None and tap._thread.is_alive()
    finally:
        for sock in (*flooders, *([good] if "good" in locals() else [])):
            sock.close(linger=0)
        ctx.term()
        tap.close()


# ------------------------------------------------------------------------------- L9 the sidecar's image
@pytest.mark.parametrize(
    "name", ["haadf.npy", "../outside.npy", "/abs/haadf.npy", "sub/haadf.npy", "link.npy"]
)
def test_a_sidecar_image_must_be_a_plain_name_beside_it(tmp_path: Path, name: str) -> None:
    m = tmp_path / "m"
    (m / "sub").mkdir(parents=True)
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    for where in (m / "haadf.npy", tmp_path / "outside.npy", m / "sub" / "haadf.npy"):
        np.save(where, image)
    (m / "link.npy").symlink_to(tmp_path / "outside.npy")
    sidecar = m / "scan00001.json"
    sidecar.write_text(json.dumps({"scan_number": 1, "haadf_npy": name}))
    if name == "haadf.npy":
        assert np.array_equal(read_microscope_file(sidecar, MicroscopeSettings()).haadf, image)
        return
    with pytest.raises(MicroscopeMetadataError, match="haadf_npy must be a plain file name in its directory"):
        read_microscope_file(sidecar, MicroscopeSettings())
