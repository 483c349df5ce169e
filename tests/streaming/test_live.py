"""The live view end to end with real processes: two nodes send snapshots out to a view server, whose images
equal, to the last count, the sums from the written file; the nodes agree on the estimated BF geometry
through the view; a tap subscriber receives every counted frame while a subscriber that never reads costs
nothing; the nodes listen on nothing but the scan writer and the tap.
Over CURVE a node with an unknown key is refused; an exposed page refuses requests without the token."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from counting.geometry import ScanShape
from counting.kernel import EventList
from counting.settings import CountingSettings
from counting.simulator import SimulatorConfig
from stemstream_testing.live_oracle import live_sums_from_file
from stemstream_testing.pipeline import ProcessPipeline
from stemstream_testing.support import free_port
from streaming.components import node_config, server_curve
from streaming.live.publisher import LivePublisher
from streaming.protocol import control as p
from streaming.protocol import live as live_wire
from streaming.settings import CurveSettings, LiveSettings, StreamingSettings
from streaming.transport.security import write_keypair
from streaming.view.server import LiveServer

pytestmark = pytest.mark.timeout(300)
GEOMETRY = {"bf_center": (288.0, 288.0), "bf_radius": 180.0}


def wait_for(check, timeout: float, what: str):
    """Poll check() until it returns something true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise TimeoutError(what)


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process (and its children) listens on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.port for pr in procs for c in pr.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


class TapReader:
    """A SUB on both nodes' taps, collecting counted frames per scan key until each node's tap.end."""

    def __init__(self, ctx: zmq.Context, ports: list[int], hwm: int = 0) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"tap.")
        for port in ports:
            self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.frames: list[int] = []
        self.ends: dict[str, dict] = {}
        self.seqs: dict[str, list[int]] = {}

    def read(self, nodes: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ends) < nodes and time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            kind, header, arrays = live_wire.decode(self.sock.recv_multipart())
            if kind == live_wire.TAP_EVENTS:
                assert len(arrays["offsets"]) == header["frames"] + 1
                self.frames.extend(int(n) for n in arrays["frame_numbers"])
                self.seqs.setdefault(header["node"], []).append(header["seq"])
            elif kind == live_wire.TAP_END:
                self.ends[header["node"]] = header


def test_live_images_tap_and_nothing_listening(tmp_path: Path):
    tap_port = free_port()
    # The geometry estimated: the nodes settle on the one the view agrees, so their images add up exactly.
    live = {"bind": f"tcp://127.0.0.1:{free_port()}", "tap": True, "tap_port": tap_port}
    view = LiveServer(LiveSettings(**live, page_port=0), scan_dir=tmp_path / "out").start()
    ctx = zmq.Context()
    try:
        with ProcessPipeline(tmp_path, 2, streaming={"live": live}) as pipe:
            reader = TapReader(ctx, [tap_port, tap_port + 1])
            stalled = TapReader(ctx, [tap_port, tap_port + 1], hwm=2)  # subscribes, then never reads
            time.sleep(1.0)  # both subscriptions reach the nodes
            config = SimulatorConfig(ScanShape(24, 20), seed=4)
            pipe.send(config, scan_number=1)
            reader.read(2, 60)
            record, h5 = pipe.record(1)
            pipe.send(config, scan_number=2)  # the stalled subscriber's queue is long full
            record2, _ = pipe.record(2)

            scan = wait_for(
                lambda: [s for s in view.state.scans() if s["scan_number"] == 1 and s["file"]], 30, "file"
            )[0]
            assert scan["status"] == "done" and scan["frames"] == 480 and scan["completeness"] == 1.0
            assert scan["sectors_lost"] == 0 and not scan["geometries_differ"] and scan["nodes"] == 2
            assert Path(scan["file"]) == h5
            g = view.state.scan(scan["key"]).geometry()
            want = live_sums_from_file(h5, g.cx, g.cy, g.bf_radius, g.adf_inner, g.adf_outer)
            merged = view.state.scan(scan["key"]).merged()
            for name in ("counts", "bf", "adf", "sum_col", "sum_row", "frames", "pattern"):
                np.testing.assert_array_equal(getattr(merged, name), want[name], err_msg=name)

            assert sorted(reader.frames) == sorted(set(reader.frames)) and len(reader.frames) == 480
            assert sum(e["frames"] for e in reader.ends.values()) == 480
            for node, seqs in reader.seqs.items():
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), node  # no batch missed
            assert record.status.value == "complete" and record2.status.value == "complete"

            taps = set()
            for name in ("n0", "n1"):  # the node the aggregator made the writer host listens for the writer
                writer = re.findall(r"hosting the scan writer at tcp://[\d.]+:(\d+)", pipe.log(name))
                # ... and its metrics exporter (streaming.metrics, on by default) on the port it printed.
                metrics = re.findall(r"metrics: http://[\d.]+:(\d+)/metrics", pipe.log(name))
                assert len(metrics) == 1, (name, metrics)
                ports = listening_ports(pipe.procs[name].pid) - {int(w) for w in writer + metrics}
                assert len(ports) == 1 and ports <= {tap_port, tap_port + 1}, (name, ports)
                taps |= ports
            assert taps == {tap_port, tap_port + 1}
            stalled.sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)
        view.stop()


def test_curve_snapshots_and_the_token(tmp_path: Path):
    keys = tmp_path / "keys"
    server_pub, server_secret = write_keypair(keys, "aggregator")
    node_pub, node_secret = write_keypair(keys, "node")
    _, stranger_secret = write_keypair(keys, "stranger")
    bind = f"tcp://127.0.0.1:{free_port()}"
    live = LiveSettings(bind=bind, connect=bind, page_port=0, token_required=True, interval=0.05, **GEOMETRY)
    curve = CurveSettings(server_secret_file=server_secret, allowed_clients=[node_pub])
    view = LiveServer(live, server_curve(curve)).start()
    publishers = []
    try:
        for name, secret in (("node", node_secret), ("stranger", stranger_secret)):
            st = StreamingSettings(
                live=live, curve=CurveSettings(client_secret_file=secret, server_public_file=server_pub)
            )
            cfg = node_config(
                st, CountingSettings(), aggregator="tcp://127.0.0.1:1", output_dir=tmp_path, name=name
            )
            pub = LivePublisher(
                zmq.Context.instance(), cfg.name, cfg.streaming.live, cfg.aggregator, cfg.curve
            )
            publishers.append(pub)
            key = f"key-{name}"
            pub.begin(p.ScanBegin(7, 4, 4, 16, 0, 1, scan_key=key))
            events = EventList(np.array([0, 288 * 576 + 288], np.uint32), np.array([0, 1, 2]))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not view.state.scan(key):
                pub.batch(key, np.array([0, 5]), np.array([15, 15], np.uint8), events.offsets, events.indices)
                time.sleep(0.2)
            pub.end(key)
        scans = {s["key"]: s for s in view.state.scans()}
        assert "key-node" in scans and "key-stranger" not in scans
        base = f"http://127.0.0.1:{view.port}/api/state"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base, timeout=10)
        assert refused.value.code == 401
        with urllib.request.urlopen(f"{base}?token={view.token}", timeout=10) as ok:
            assert "key-node" in {s["key"] for s in json.load(ok)["scans"]}
    finally:
        for pub in publishers:
            pub.close()
        view.stop()
