"""Peak memory of every process of a running pipeline under the audit's hostile inputs (tests/hostile/).

Real processes on loopback: `stemstream aggregator` with one forwarding process (streaming.aggregator_processes
2), two `stemstream node` (node 0 hosts the scan writer; the counted-data tap on), and `stemstream view` (the
page asks for a token). Every port they listen on is found from /proc and fired at for a bounded time
(stemstream_testing.hostile_inputs): oversized and malformed sector headers (the 65535x65535 scan), stray
sectors of other scan numbers, messages beyond ZMQ_MAXMSGSIZE, wrong-typed control, hub and writer messages,
garbage frames, malformed live snapshots, distinct and oversized subscriptions and slow subscribers on the
PUB sockets, bad Host, Origin and token HTTP requests, half-open connections and more WebSocket clients than
the page serves. Each process's VmRSS is sampled every 0.2 s. Then one real scan goes through (the slow tap
subscribers and WebSocket clients still connected) and its file must be complete and identical to offline
counting. Prints per process the baseline, peak during the attack and the scan, and after; per port what
was sent; writes JSON.

Usage: python benchmarks/bench_hostile_memory.py [--seconds 40] [--rate 150] [--side 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
import zmq

# stemstream_testing (test support) is not installed: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import ScanShape  # noqa: E402
from counting.kernel import Thresholds  # noqa: E402
from counting.pipeline import count_batches  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402
from counting.sparse import read_counted_scan  # noqa: E402
from stemstream_testing import hostile_inputs as h  # noqa: E402
from stemstream_testing.options import options  # noqa: E402
from stemstream_testing.pipeline import ProcessPipeline  # noqa: E402
from stemstream_testing.support import free_port, wait_until  # noqa: E402
from streaming.transport.addresses import offset_address, port_of  # noqa: E402
from streaming.view.ingest import max_part_bytes  # noqa: E402
from tasks.launch.processes import process_tree, rss_kb  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FIXED = Thresholds(30.5, 600.0)
TOKEN = "hostile-bench-token-0123456789"
PHASES = ("baseline", "attack", "settle", "scan", "after")
MB = 1024.0


# --------------------------------------------------------------------------------------------- memory
class Sampler:
    """VmRSS (kB) of every pipeline process and its children every ``interval`` s, peak per phase."""

    def __init__(self, roots: dict[str, int], interval: float = 0.2) -> None:
        self.roots, self.interval = roots, interval
        self.phase = "baseline"
        self.peak: dict[str, dict[str, int]] = {}
        self.last: dict[str, dict[str, int]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def processes(self) -> dict[str, int]:
        """Label -> pid: the roots and their children (a forwarding process, counting workers)."""
        out = {}
        for label, pid in list(self.roots.items()):
            out[label] = pid
            children = [q for q in process_tree(pid)[1:] if "resource_tracker" not in _cmdline(q)]
            what = "forwarder" if label == "aggregator" else "worker"
            for i, q in enumerate(sorted(children), 1):
                out[f"{label.split(' (')[0]} {what} {i}"] = q
        return out

    def start(self) -> Sampler:
        """Start sampling in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            phase = self.phase
            for label, pid in self.processes().items():
                kb = rss_kb(pid)
                if kb:
                    peaks = self.peak.setdefault(label, {})
                    peaks[phase] = max(peaks.get(phase, 0), kb)
                    self.last.setdefault(label, {})[phase] = kb
            self.samples += 1
            self._stop.wait(self.interval)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def listening(pids: dict[str, int]) -> dict[int, str]:
    """Every TCP port a pipeline process listens on -> the process's label."""
    out = {}
    for label, pid in pids.items():
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out[c.laddr.port] = label
    return out


# ------------------------------------------------------------------------------------------ pipeline
def pick_pair() -> int:
    """A free port p with p + 1 free too (the taps of node 0 and node 1)."""
    while True:
        port = free_port()
        if h_bindable(port + 1):
            return port


def h_bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start(work: Path) -> tuple[ProcessPipeline, dict]:
    """The pipeline (aggregator + 1 forwarder, 2 nodes with the tap) and the view; its ports."""
    token_file = work / "token"
    work.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    ports = {"page": free_port(), "live": free_port(), "tap": pick_pair(), "writer": free_port()}
    live = {"bind": f"tcp://127.0.0.1:{ports['live']}", "page_port": ports["page"], "token_required": True,
            "tap": True, "tap_port": ports["tap"]}  # fmt: skip
    streaming = {"aggregator_processes": 2, "writer_bind": f"tcp://127.0.0.1:{ports['writer']}", "live": live}
    counting = {"background_threshold": FIXED.background, "xray_threshold": FIXED.xray}
    pipe = ProcessPipeline(work, 2, streaming=streaming, counting=counting, rss_interval=5.0)
    try:
        pipe._start("view", ["view", "--scan-dir", "out", "--token-file", str(token_file)])
        if not wait_until(lambda: "live:" in pipe.log("view"), 90):
            raise TimeoutError(f"the view did not start: {pipe.tails()}")
        ports["page"] = int(pipe.log("view").split("live: ")[1].split("/")[2].rsplit(":", 1)[1])
        pipe.wait_state(lambda s: bool(s.writer), 30)
    except BaseException:
        pipe.close()
        raise
    return pipe, ports


# ----------------------------------------------------------------------------------------- attacking
def attacks(
    pipe: ProcessPipeline,
    ports: dict,
    hub: str,
    writer_node: str,
    strays: int,
    without: tuple[str, ...] = (),
    tap_flood: bool = True,
) -> list[tuple[h.Attack, Callable]]:
    """Every port with its attacker (a callable taking stop, rate)."""
    stride = 100  # streaming.aggregator_port_stride: forwarder 1 binds every port + 100
    receiver0, nodes0 = pipe.receiver, pipe.nodes_address
    big_view = h.sized(
        b"live.snap",
        ("snapshot_beyond_maxmsgsize", max_part_bytes(4096 * 4096) + 4096),
        ("snapshot_64MB_within_limit", 64 << 20),
    )
    plan = [
        (h.Attack("receiver (path 0)", receiver0), zmq.PUSH, h.sector_kinds(700), (2.0, h.oversized)),
        (h.Attack("receiver (path 1, forwarder)", offset_address(receiver0, stride)), zmq.PUSH,
         h.sector_kinds(800), (2.0, h.oversized)),
        (h.Attack("nodes_bind (path 0)", nodes0), zmq.DEALER, h.control_kinds(writer_node), (2.0, h.oversized)),
        (h.Attack("nodes_bind (path 1, forwarder)", offset_address(nodes0, stride)), zmq.DEALER,
         h.forwarder_node_kinds(writer_node), (2.0, h.oversized)),
        (h.Attack("forwarder hub", hub), zmq.DEALER, h.hub_kinds(),
         (1.0, h.sized(b"f.progress", ("message_4MB_no_maxmsgsize", 4 << 20)))),
        (h.Attack("writer_bind", f"tcp://127.0.0.1:{ports['writer']}"), zmq.DEALER, h.writer_kinds(),
         (1.0, h.sized(b"w.events", ("message_4MB_no_maxmsgsize", 4 << 20)))),
        (h.Attack("live.bind (view intake)", f"tcp://127.0.0.1:{ports['live']}"), zmq.DEALER,
         h.snapshot_kinds(), (0.2, big_view)),
    ]  # fmt: skip
    limits = {"stray_sector_other_scan": strays}  # each stray scan number opens a scan (2 s): a few
    limits |= dict.fromkeys(without, 0)  # kinds left out (--without)
    out = [(a, _zmq_runner(a, kind, kinds, big, limits)) for a, kind, kinds, big in plan]
    taps = tuple((f"tap node {i}", f"tcp://127.0.0.1:{ports['tap'] + i}") for i in range(2))
    for name, address in (("monitor_bind", pipe.monitor),) + (taps if tap_flood else ()):
        small = h.Attack(name, address)
        out.append((small, lambda stop, rate, a=small: h.subscription_attack(a, stop, rate, 64)))
        large = h.Attack(f"{name} (subscriptions of 2 kB)", address)
        out.append((large, lambda stop, rate, a=large: h.subscription_attack(a, stop, rate / 10, 2048)))
    page = h.Attack("live.page_port (HTTP)", f"http://127.0.0.1:{ports['page']}/")
    out.append((page, lambda stop, rate: h.page_attack(page, stop, rate / 3, ports["page"], TOKEN)))
    return out


def _zmq_runner(attack: h.Attack, kind: int, kinds: dict, big: tuple, limits: dict) -> Callable:
    return lambda stop, rate: h.zmq_attack(attack, kind, kinds, stop, rate, big, limits)


# ---------------------------------------------------------------------------------------- the check
def offline(config: SimulatorConfig):
    """The scan counted offline with the same fixed thresholds."""
    cam = SimulatedCamera(config)
    return count_batches(cam.iter_batches(64), cam.scan, None, options(fixed=FIXED))


def real_scan(pipe: ProcessPipeline, side: int, number: int) -> dict:
    """One real scan; complete and identical to offline counting?"""
    config = SimulatorConfig(ScanShape(side, side), dose=100.0, seed=number)
    t0, before = time.monotonic(), pipe.state
    sent = pipe.send(config, number, send_timeout=120)
    record, path = pipe.record(number, timeout=180)
    after = pipe.state
    counters = {
        k: getattr(after, k) - getattr(before, k) for k in ("received", "malformed", "late", "refused")
    }
    got, want = read_counted_scan(path), offline(config)
    same = all(np.array_equal(x, y) for x, y in zip(got.events.ravel(), want.events.ravel(), strict=True))
    return {"scan": f"{side}x{side}", "status": str(getattr(record.status, "value", record.status)), "completeness": got.completeness,
            "identical_to_offline": bool(same), "seconds": round(time.monotonic() - t0, 2),
            "sectors_sent": sent.sent, "aggregator_during_scan": counters, "reasons": record.reasons,
            "lost_in_transit": record.sectors_lost_in_transit,
            "per_path_after": {str(k): v for k, v in after.per_path.items()}}  # fmt: skip


def view_state(port: int) -> dict:
    """The view's /api/state (with the token): malformed snapshots, intake alive."""
    r = httpx.get(f"http://127.0.0.1:{port}/api/state?token={TOKEN}", timeout=10)
    state = r.json()
    return {"malformed": state.get("malformed"), "intake": state.get("intake"), "scans": len(state["scans"])}


# -------------------------------------------------------------------------------------------- main
def say(line: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, work: Path) -> dict:
    """Start, attack, settle, scan; the figures."""
    say("starting the pipeline and the view")
    pipe, ports = start(work)
    say(f"started; ports {ports}")
    try:
        writer = pipe.state.writer  # node index 0 hosts the scan writer
        other = "n1" if writer == "n0" else "n0"
        roots = {"aggregator": pipe.procs["agg"].pid, f"node 0 ({writer}) + writer": pipe.procs[writer].pid,
                 f"node 1 ({other})": pipe.procs[other].pid, "view": pipe.procs["view"].pid}  # fmt: skip
        sampler = Sampler(roots).start()
        found = listening(sampler.processes())
        known = {port_of(pipe.receiver), port_of(pipe.nodes_address), port_of(pipe.monitor)}
        metrics = r"^metrics: http://\S+:(\d+)/metrics$"  # HTTP exporters (streaming.metrics), not the hub
        known |= {int(m) for n in pipe.procs for m in re.findall(metrics, pipe.log(n), re.M)}
        hub_port = next(p for p, who in found.items() if who == "aggregator" and p not in known)
        plan = attacks(
            pipe,
            ports,
            f"tcp://127.0.0.1:{hub_port}",
            writer,
            args.strays,
            tuple(args.without.split(",")) if args.without else (),
            args.tap_flood,
        )
        time.sleep(args.baseline)
        before = pipe.state
        logs_before = {n: (work / f"{n}.log").stat().st_size for n in pipe.procs}
        out = attack_then_scan(args, pipe, ports, plan, sampler)
        attacked = out.pop("attacked")
        sampler.phase = "after"
        time.sleep(args.baseline)
        sampler.stop()
        attacked_ports = {port_of(a["address"].rstrip("/").split("/ws")[0]) for a in out["attacks"]}
        return {
            "processes": {label: {ph: round(kb / MB, 1) for ph, kb in peaks.items()}
                          for label, peaks in sampler.peak.items()},
            "last_mb": {label: {ph: round(kb / MB, 1) for ph, kb in last.items()}
                        for label, last in sampler.last.items()},
            "samples": sampler.samples,
            "listening": {str(p): who for p, who in sorted(found.items())},
            "listening_not_attacked": sorted(set(found) - attacked_ports),
            "aggregator_counters": {k: getattr(attacked, k) - getattr(before, k)
                                    for k in ("malformed", "refused", "late", "unroutable")},
            "log_growth_bytes": {n: (work / f"{n}.log").stat().st_size - logs_before[n] for n in pipe.procs},
            "stray_scan_records": len([p for p in (work / "out").glob("*.json") if "_00042" not in p.name]),
            "alive_at_end": {n: pr.poll() is None for n, pr in pipe.procs.items()},
            **out,
        }  # fmt: skip
    finally:
        pipe.close()


def attack_then_scan(
    args: argparse.Namespace, pipe: ProcessPipeline, ports: dict, plan: list, sampler: Sampler
) -> dict:
    """Fire at every port for args.seconds (WebSocket clients and slow tap subscribers held on through the
    scan), let the pipeline settle, then one real scan."""
    sampler.phase = "attack"
    say(f"attacking {len(plan)} ports for {args.seconds:g} s")
    stop = threading.Event()
    threads = [threading.Thread(target=fn, args=(stop, args.rate), daemon=True) for _, fn in plan]
    for t in threads:
        t.start()
    page = next(a for a, _ in plan if a.port.startswith("live.page_port"))
    ws = h.Attack("live.page_port (WebSocket)", f"ws://127.0.0.1:{ports['page']}/ws")
    taps = [h.Attack(f"tap node {i} (slow subscribers)", f"tcp://127.0.0.1:{ports['tap'] + i}")
            for i in range(2)]  # fmt: skip
    clients = h.websocket_flood(ws, ports["page"], TOKEN, args.websockets)
    half_open = h.connection_flood(page, ports["page"], args.half_open)
    try:
        with h.slow_subscribers(taps[0].address, 8, taps[0]), h.slow_subscribers(taps[1].address, 8, taps[1]):
            stop.wait(args.seconds)
            beyond = h.beyond_concurrency(page, ports["page"], args.beyond)
            stop.set()
            for t in threads:
                t.join(30)
            for sock in half_open:
                sock.close()
            alive = {n: pr.poll() is None for n, pr in pipe.procs.items()}
            attacked, view = pipe.state, view_state(ports["page"])
            sampler.phase = "settle"
            say("attack over; waiting for the pipeline to be idle")
            idle = wait_idle(pipe)
            time.sleep(args.baseline)
            sampler.phase = "scan"
            say("the real scan")
            scan = real_scan(pipe, args.side, 42)
    finally:
        h.close_all(clients)
    attacks_out = [{"port": a.port, "address": a.address, "sent": dict(a.sent), "total": a.total,
                    "not_taken": a.not_taken, "notes": a.notes[:12]}
                   for a in [*(a for a, _ in plan), ws, *taps]]  # fmt: skip
    return {"attacks": attacks_out, "attacked": attacked, "alive_after_attack": alive,
            "view_after_attack": view, "beyond_concurrency": beyond, "idle_again_after_s": idle,
            "scan": scan}  # fmt: skip


def wait_idle(pipe: ProcessPipeline) -> float:
    """Seconds until no scan is open and both nodes are armed (the stray scans ended)."""
    t0 = time.monotonic()
    pipe.wait_state(lambda s: s.scan_expected == 0 and s.nodes_ready == 2, 300)
    return round(time.monotonic() - t0, 2)


def report(result: dict) -> None:
    """Print the tables."""
    print(f"\n{'process':<30}" + "".join(f"{ph:>10}" for ph in PHASES) + "   (VmRSS peak per phase, MB)")
    for label, peaks in result["processes"].items():
        print(f"{label:<30}" + "".join(f"{peaks.get(ph, '—'):>10}" for ph in PHASES))
    print(f"\n{'port':<44} {'messages':>9} {'not taken':>9}")
    for a in result["attacks"]:
        print(f"{a['port']:<44} {a['total']:>9} {a['not_taken']:>9}")
    for key in (
        "aggregator_counters",
        "view_after_attack",
        "beyond_concurrency",
        "alive_after_attack",
        "log_growth_bytes",
        "idle_again_after_s",
        "scan",
        "listening",
        "listening_not_attacked",
    ):
        print(f"{key}: {result[key]}")  # fmt: skip
    print(f"stray scan records written: {result['stray_scan_records']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the ports are fired at")
    ap.add_argument("--rate", type=float, default=150.0, help="small messages per second per port")
    ap.add_argument("--side", type=int, default=32, help="the real scan's side (positions)")
    ap.add_argument("--websockets", type=int, default=40, help="WebSocket clients that never read")
    ap.add_argument("--half-open", type=int, default=48, help="half-sent HTTP requests held open")
    ap.add_argument(
        "--beyond", type=int, default=40, help="more half-open connections at the end (past the limit)"
    )
    ap.add_argument("--strays", type=int, default=12, help="stray sectors per receiver port (3 scan numbers)")
    ap.add_argument("--baseline", type=float, default=3.0, help="seconds sampled before and after")
    ap.add_argument(
        "--keep", type=Path, default=None, help="work directory to keep (default: a temporary one)"
    )
    ap.add_argument(
        "--tap-flood",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="subscription floods on the taps (--no-tap-flood: only the slow subscribers)",
    )
    ap.add_argument("--without", default="", help="message kinds to leave out, comma-separated")
    ap.add_argument("--json", type=Path, default=RESULTS / "hostile_memory.json")
    args = ap.parse_args()
    t0 = time.monotonic()
    if args.keep is not None:  # the processes' logs and files stay there
        result = run(args, args.keep)
        result["node_counters_at_exit"] = {  # written by each node as it stops
            log.stem: [line.split("node finished: ", 1)[1] for line in log.read_text().splitlines()
                       if "node finished: " in line]
            for log in sorted(args.keep.glob("n*.log"))
        }  # fmt: skip
    else:
        with tempfile.TemporaryDirectory(prefix="stemstream-hostile-") as tmp:
            result = run(args, Path(tmp))
    result = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "wall_s": round(time.monotonic() - t0, 1), **result}  # fmt: skip
    report(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.json} ({result['wall_s']} s)")
    ok = result["scan"]["identical_to_offline"] and result["scan"]["completeness"] == 1.0
    sys.exit(0 if ok and all(result["alive_at_end"].values()) else 1)


if __name__ == "__main__":
    main()
