"""Aggregator scale-out, plain and CURVE: forwarding throughput with K = 1 and K = 2 forwarding processes,
CPU seconds per GB forwarded (user and system) for the aggregator's processes and for a node's receive
path, and the cores each would need for 7.2 GB/s (the published system) and 57.7 GB/s (the camera's peak).

    sender process --PUSH (connected to every forwarding process)--> aggregator (K processes)
        --ROUTER/DEALER (plain or CURVE), one connection per process--> one sink node process

Messages are the real wire format (a msgpack SectorHeader and a 165,888-byte sector, sent zero-copy from a
pool of buffers); the aggregator is the real one (streaming.aggregator.aggregator with streaming.aggregator.forwarder); the sink
node speaks the node protocol (hello, welcome, attach to every forwarder, ready) and touches every payload,
but does not count (the counting side is measured by bench_streaming). All processes share this machine's
cores, so the rate is bounded by them; the per-GB CPU costs are what the projection uses:
cores = GB/s x CPU-seconds per GB. Assumptions: costs scale linearly with rate and with K (no shared state
between forwarding processes), one core per forwarding process at most (Python is single-threaded per
process; ZeroMQ's I/O threads add the system time), and loopback TCP costs what a NIC path costs in CPU
(a real 100 GbE path adds interrupt handling, so the projection is a lower bound on cores).

Usage: python benchmarks/bench_scaleout.py [--messages 8000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np
import psutil
import zmq
from sector_feed import Inbox, process_cpu, push_scan

from counting.geometry import SECTOR_BYTES
from streaming.protocol import control as p

RESULTS = Path(__file__).parent / "results"
TIMEOUT_S = 120.0
HWM = 1000
PUBLISHED_GBPS = 7.2
CAMERA_PEAK_GBPS = 57.7
CONFIGS = [(1, False), (2, False), (1, True), (2, True)]  # (K, CURVE)


def _keys() -> dict:
    """A server and a client key pair (z85)."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return {
        "server": (server_public.decode(), server_secret.decode()),
        "client": (client_public.decode(), client_secret.decode()),
    }


def aggregator_proc(k: int, keys: dict | None, messages: int, out: mp.Queue) -> None:
    """The real aggregator with K forwarding processes and one node; reports its processes' CPU."""
    from streaming.aggregator.aggregator import Aggregator
    from streaming.settings import StreamingSettings
    from streaming.transport.security import CurveServerConfig

    logging.basicConfig(level=logging.WARNING)
    settings = StreamingSettings(
        receivers=["tcp://127.0.0.1:0"],
        nodes_bind="tcp://127.0.0.1:0",
        monitor_bind=None,
        n_nodes=1,
        scan_deadline=10.0,
        aggregator_processes=k,
    )
    curve = None
    if keys is not None:
        curve = CurveServerConfig(keys["server"][1], keys["server"][0], (keys["client"][0],))
    with Aggregator(settings, curve) as agg:
        out.put(("endpoints", (agg.receiver_endpoints[0], agg.nodes_endpoint)))
        procs = (
            [psutil.Process()] + [psutil.Process(x.process.pid) for x in agg.hub.forwarders.values()]
            if agg.hub
            else [psutil.Process()]
        )
        before = [pr.cpu_times() for pr in procs]
        snap: dict = {}

        def until(stats) -> bool:
            if stats.forwarded < messages:
                return False
            snap["after"] = [pr.cpu_times() for pr in procs]  # before run() stops the forwarders
            return True

        stats = agg.run(until=until, timeout=TIMEOUT_S)
        if "after" not in snap:
            print(f"aggregator: only {stats.forwarded} of {messages} forwarded in {TIMEOUT_S:g} s: {stats}")
        after = snap.get("after") or before
        out.put(
            (
                "cpu:aggregator",
                {
                    "user": sum(a.user - b.user for a, b in zip(after, before)),
                    "system": sum(a.system - b.system for a, b in zip(after, before)),
                    "processes": len(procs),
                    "complete": "after" in snap,
                },
            )
        )


def node_proc(nodes: str, keys: dict | None, messages: int, out: mp.Queue) -> None:
    """A sink node: joins (hello, attach to every forwarder, ready), receives and touches every payload."""
    from streaming.node.path_links import forwarder_address

    ctx = zmq.Context(io_threads=2)

    def dealer(address: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.rcvhwm = HWM
        if keys is not None:
            sock.curve_publickey = keys["client"][0].encode()
            sock.curve_secretkey = keys["client"][1].encode()
            sock.curve_serverkey = keys["server"][0].encode()
        sock.connect(address)
        return sock

    main = dealer(nodes)
    main.send_multipart(p.encode(p.Hello("bench-node", os.getpid())))
    kind, body = main.recv_multipart()
    welcome = p.decode(kind, body, p.Welcome)
    paths = [dealer(forwarder_address(nodes, port)) for port in welcome.data_ports]
    for sock in paths:
        sock.send_multipart(p.encode(p.Attach("bench-node")))
        sock.recv_multipart()  # the answer
    main.send_multipart(p.encode(p.Ready("bench-node")))
    out.put(("armed", True))
    poller = zmq.Poller()
    for sock in [main, *paths]:
        poller.register(sock, zmq.POLLIN)
    got, checksum, first, since = 0, 0, 0.0, (0.0, 0.0)
    deadline = time.monotonic() + TIMEOUT_S
    beat = 0.0
    while got < messages and time.monotonic() < deadline:
        if time.monotonic() - beat > 1.0:  # liveness: the aggregator drops a node silent for node_timeout
            main.send_multipart(p.encode(p.Heartbeat("bench-node", "streaming")))
            beat = time.monotonic()
        for sock, _ in poller.poll(100):
            while got < messages:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if parts[0].bytes != p.DATA:
                    continue
                if time.monotonic() - beat > 1.0:
                    main.send_multipart(p.encode(p.Heartbeat("bench-node", "streaming")))
                    beat = time.monotonic()
                if got == 0:
                    first, since = time.perf_counter(), process_cpu()
                checksum += int(np.frombuffer(parts[2].buffer, np.uint8)[-1])
                got += 1
    seconds = time.perf_counter() - first
    user, system = (a - b for a, b in zip(process_cpu(), since))
    out.put(("result", {"messages": got - 1, "seconds": seconds, "checksum": checksum}))
    out.put(("cpu:node", {"user": user, "system": system}))
    for sock in [main, *paths]:
        sock.close(linger=0)
    ctx.term()


def sender_proc(endpoints: str, messages: int, start: mp.Event, out: mp.Queue) -> None:
    """One scan's sectors, zero-copy, to every forwarding process (ZeroMQ spreads them)."""
    sent, _ = push_scan(endpoints, messages, start, hwm=HWM, timeout=TIMEOUT_S, io_threads=2)
    out.put(("sent", sent))


def run_config(k: int, curve: bool, messages: int) -> dict:
    """One timed run: K forwarding processes, plain or CURVE."""
    ctx = mp.get_context("spawn")
    inbox, start = Inbox(ctx.Queue(), TIMEOUT_S), ctx.Event()
    keys = _keys() if curve else None
    procs = []

    def spawn(target, *args) -> None:
        proc = ctx.Process(target=target, args=(*args, inbox.queue), daemon=False)
        proc.start()
        procs.append(proc)

    try:
        spawn(aggregator_proc, k, keys, messages)
        receivers, nodes = inbox.get("endpoints")
        spawn(node_proc, nodes, keys, messages)
        spawn(sender_proc, receivers, messages, start)
        inbox.get("armed")  # a scan that began before the node was ready would be refused
        time.sleep(0.5)  # the aggregator has taken the ready, the sender is connected
        start.set()
        result = dict(inbox.get("result"))
        agg_cpu, node_cpu = inbox.get("cpu:aggregator"), inbox.get("cpu:node")
    finally:
        for proc in procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    gb = messages * SECTOR_BYTES / 1e9
    rate = result["messages"] * SECTOR_BYTES / 1e9 / result["seconds"]
    return {
        "k": k,
        "curve": curve,
        "gb_per_s": rate,
        "aggregator_cpu_s_per_gb": {"user": agg_cpu["user"] / gb, "system": agg_cpu["system"] / gb},
        "node_cpu_s_per_gb": {"user": node_cpu["user"] / gb, "system": node_cpu["system"] / gb},
        "aggregator_processes": agg_cpu["processes"],
    }


def project(run: dict) -> dict:
    """Cores for the published rate and the camera's peak, from the per-GB CPU costs."""
    agg = sum(run["aggregator_cpu_s_per_gb"].values())
    node = sum(run["node_cpu_s_per_gb"].values())
    return {
        f"aggregator_cores_{PUBLISHED_GBPS}": agg * PUBLISHED_GBPS,
        f"aggregator_cores_{CAMERA_PEAK_GBPS}": agg * CAMERA_PEAK_GBPS,
        f"node_receive_cores_{PUBLISHED_GBPS}": node * PUBLISHED_GBPS,
        f"node_receive_cores_{CAMERA_PEAK_GBPS}": node * CAMERA_PEAK_GBPS,
    }


def main() -> None:
    """Run every configuration once, side by side; print the table and the projection; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=8000)
    ap.add_argument("--json", type=Path, default=RESULTS / "scaleout.json")
    args = ap.parse_args()
    runs = [run_config(k, curve, args.messages) for k, curve in CONFIGS]
    base = {curve: next(r for r in runs if r["k"] == 1 and r["curve"] == curve) for curve in (False, True)}
    print(f"{'K':>2} {'hop':>6} {'GB/s':>6} {'vs K=1':>7} {'agg CPU s/GB (user+sys)':>24} {'node s/GB':>10}")
    for r in runs:
        a, n = r["aggregator_cpu_s_per_gb"], r["node_cpu_s_per_gb"]
        r["ratio_vs_k1"] = r["gb_per_s"] / base[r["curve"]]["gb_per_s"]
        r["projection"] = project(r)
        print(
            f"{r['k']:>2} {'CURVE' if r['curve'] else 'plain':>6} {r['gb_per_s']:6.2f} {r['ratio_vs_k1']:6.2f}x "
            f"{a['user']:9.2f} + {a['system']:5.2f} = {a['user'] + a['system']:5.2f} "
            f"{n['user'] + n['system']:10.2f}"
        )
    plain, enc = base[False], base[True]
    curve_cost = sum(enc["aggregator_cpu_s_per_gb"].values()) / sum(plain["aggregator_cpu_s_per_gb"].values())
    print(f"CURVE / plain aggregator CPU per GB (K=1): {curve_cost:.2f}x (target <= 2x)")
    for r in runs:
        pr = r["projection"]
        print(
            f"K={r['k']} {'CURVE' if r['curve'] else 'plain'}: for {PUBLISHED_GBPS} GB/s the aggregator needs "
            f"{pr[f'aggregator_cores_{PUBLISHED_GBPS}']:.1f} cores, node receive "
            f"{pr[f'node_receive_cores_{PUBLISHED_GBPS}']:.1f} cores (all nodes together); for "
            f"{CAMERA_PEAK_GBPS} GB/s: {pr[f'aggregator_cores_{CAMERA_PEAK_GBPS}']:.1f} and "
            f"{pr[f'node_receive_cores_{CAMERA_PEAK_GBPS}']:.1f}"
        )
    print(
        f"bounded by this machine's {os.cpu_count()} cores, shared by the sender, the aggregator's processes and the node"
    )
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "messages": args.messages,
        "runs": runs,
        "curve_over_plain_cpu": curve_cost,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
