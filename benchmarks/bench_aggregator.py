"""Aggregator forwarding throughput next to a single raw PUSH/PULL hop, same messages, same machine, one run.

(a) raw hop:    sender process --PUSH/PULL--> receiver process
(b) aggregator: sender process --PUSH/PULL--> aggregator process --ROUTER/DEALER--> receiving node process
(c) C proxy:    sender process --PUSH/PULL--> zmq.proxy process (libzmq, no Python per message) --> receiver
                (reference: what any extra hop costs on this machine, whatever the forwarder does)

Messages are the real wire format: 2 parts, a msgpack SectorHeader and a 165,888-byte sector, sent zero-copy
from a pool of 8 buffers; receivers take them zero-copy and touch every payload. The aggregator validates
each header, routes it and forwards the received frames (zero-copy) exactly as in production, with one node.
Rates are measured at the final receiver, first to last message. Each process also reports the CPU time it
spent while streaming (user = Python and libzmq, system = mostly the kernel's socket copies), per message.
Target: aggregator >= 80 % of the raw hop. Loopback only: CPU and memory-copy cost, not network bandwidth;
on a 2-core machine all processes and their I/O threads share the same two cores.

Usage: python benchmarks/bench_aggregator.py [--messages 16000] [--repeats 3] [--transports tcp,ipc] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq
from sector_feed import Inbox, process_cpu, push_scan

from counting.geometry import SECTOR_BYTES
from streaming.protocol import control as p

RESULTS = Path(__file__).parent / "results"
TARGET = 0.80
HWM = 1000
TIMEOUT_S = 60.0
PATHS = ("raw", "aggregator", "c_proxy")


# ------------------------------------------------------------------------------------------ processes
def _report_cpu(out: mp.Queue, role: str, since: tuple[float, float], messages: int) -> None:
    user, system = (now - then for now, then in zip(process_cpu(), since))
    out.put(
        (f"cpu:{role}", {"user_us_per_msg": 1e6 * user / messages, "sys_us_per_msg": 1e6 * system / messages})
    )


def sender(endpoint: str, messages: int, start: mp.Event, out: mp.Queue) -> None:
    """Send `messages` sectors of one valid scan (modules interleaved, frame order), zero-copy."""
    sent, (user, system) = push_scan(endpoint, messages, start, hwm=HWM, timeout=TIMEOUT_S)
    out.put(("cpu:sender", {"user_us_per_msg": 1e6 * user / sent, "sys_us_per_msg": 1e6 * system / sent}))


def pull_receiver(endpoint: str, messages: int, bind: bool, out: mp.Queue) -> None:
    """(a), (c): a PULL (bound for the raw hop, connected to the proxy) timing `messages` messages."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = HWM
    if bind:
        sock.bind(endpoint)
        out.put(("endpoint", sock.LAST_ENDPOINT.decode()))
    else:
        sock.connect(endpoint)
    _time_messages(lambda: sock.recv_multipart(copy=False)[1], messages, out)
    sock.close(linger=0)
    ctx.term()


def node_receiver(endpoint: str, messages: int, out: mp.Queue) -> None:
    """(b) A minimal node: hello, ready, then time `messages` data messages."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.rcvhwm = HWM
    sock.connect(endpoint)
    sock.send_multipart(p.encode(p.Hello("bench-node", os.getpid())))
    sock.send_multipart(p.encode(p.Ready("bench-node")))
    out.put(("armed", True))

    def next_payload() -> zmq.Frame:
        while True:
            parts = sock.recv_multipart(copy=False)
            if parts[0].bytes == p.DATA:
                return parts[2]

    _time_messages(next_payload, messages, out)
    sock.close(linger=0)
    ctx.term()


def _time_messages(receive: Callable[[], zmq.Frame], messages: int, out: mp.Queue) -> None:
    """Receive `messages` payloads, touching each; seconds from the first to the last."""
    checksum = 0
    receive()
    first, since = time.perf_counter(), process_cpu()
    for _ in range(messages - 1):
        checksum += int(np.frombuffer(receive().buffer, np.uint8)[-1])
    seconds = time.perf_counter() - first
    out.put(("result", {"messages": messages - 1, "seconds": seconds, "checksum": checksum}))
    _report_cpu(out, "receiver", since, messages - 1)


def aggregator(receiver: str, nodes: str, messages: int, out: mp.Queue) -> None:
    """(b) The real Aggregator with one node, until it has forwarded every message."""
    from streaming.aggregator.aggregator import Aggregator
    from streaming.settings import StreamingSettings

    logging.basicConfig(level=logging.WARNING)
    settings = StreamingSettings(
        receivers=[receiver], nodes_bind=nodes, monitor_bind=None, n_nodes=1, scan_deadline=10.0
    )
    with Aggregator(settings) as agg:
        out.put(("endpoints", (agg.receiver_endpoints[0], agg.nodes_endpoint)))
        since = process_cpu()
        stats = agg.run(until=lambda s: s.forwarded >= messages, timeout=TIMEOUT_S)
        _report_cpu(out, "forwarder", since, messages)
    out.put(("stats", {"forwarded": stats.forwarded, "malformed": stats.malformed}))


def c_proxy(front: str, back: str, out: mp.Queue) -> None:
    """(c) libzmq's own forwarder, no Python per message; runs until terminated."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.rcvhwm = push.sndhwm = HWM
    pull.bind(front)
    push.bind(back)
    out.put(("endpoints", (pull.LAST_ENDPOINT.decode(), push.LAST_ENDPOINT.decode())))
    zmq.proxy(pull, push)


# ------------------------------------------------------------------------------------------ orchestration
def run_path(ctx: mp.context.BaseContext, path: str, endpoints: dict[str, str], messages: int) -> dict:
    """One timed run of a path; the result has msgs/s, GB/s and CPU per message per process."""
    inbox, start = Inbox(ctx.Queue(), TIMEOUT_S), ctx.Event()
    procs: list[tuple[mp.process.BaseProcess, float]] = []  # with how long it may take to finish

    def spawn(target: Callable, *args: object) -> None:
        proc = ctx.Process(target=target, args=(*args, inbox.queue), daemon=True)
        proc.start()
        procs.append((proc, 0.0 if target is c_proxy else 10.0))  # the C proxy never returns by itself

    try:
        if path == "raw":
            spawn(pull_receiver, endpoints["raw"], messages, True)
            first_hop = inbox.get("endpoint")
        elif path == "aggregator":
            spawn(aggregator, endpoints["receiver"], endpoints["nodes"], messages)
            first_hop, nodes = inbox.get("endpoints")
            spawn(node_receiver, nodes, messages)
            inbox.get("armed")  # a scan that begins before the node is ready is refused
        else:
            spawn(c_proxy, endpoints["proxy_in"], endpoints["proxy_out"])
            first_hop, back = inbox.get("endpoints")
            spawn(pull_receiver, back, messages, False)
        spawn(sender, first_hop, messages, start)
        time.sleep(0.3)  # let connections settle, so the clock measures steady streaming
        start.set()
        result = dict(inbox.get("result"))
        roles = ["sender", "receiver"] + (["forwarder"] if path == "aggregator" else [])
        result["cpu"] = {role: inbox.get(f"cpu:{role}") for role in roles}
    finally:
        for proc, grace in procs:
            proc.join(timeout=grace)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    result["msgs_per_s"] = result["messages"] / result["seconds"]
    result["gb_per_s"] = result["msgs_per_s"] * SECTOR_BYTES / 1e9
    return result


def endpoints_for(transport: str, tmp: str) -> dict[str, str]:
    """Addresses to bind per transport (tcp: loopback, free ports; ipc: files in a private directory)."""
    names = ("raw", "receiver", "nodes", "proxy_in", "proxy_out")
    if transport == "tcp":
        return dict.fromkeys(names, "tcp://127.0.0.1:0")
    return {name: f"ipc://{tmp}/{name}" for name in names}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Medians per path, the aggregator's ratio to the raw hop and to the C proxy, CPU per message."""
    out: dict = {}
    for path, results in runs.items():
        out[path] = {
            "msgs_per_s": statistics.median(r["msgs_per_s"] for r in results),
            "gb_per_s": statistics.median(r["gb_per_s"] for r in results),
            "runs_msgs_per_s": [round(r["msgs_per_s"]) for r in results],
            "cpu_us_per_msg": {
                role: {k: round(statistics.median(r["cpu"][role][k] for r in results), 1) for k in usage}
                for role, usage in results[0]["cpu"].items()
            },
        }
    out["ratio_to_raw"] = out["aggregator"]["msgs_per_s"] / out["raw"]["msgs_per_s"]
    out["ratio_to_c_proxy"] = out["aggregator"]["msgs_per_s"] / out["c_proxy"]["msgs_per_s"]
    out["c_proxy_ratio_to_raw"] = out["c_proxy"]["msgs_per_s"] / out["raw"]["msgs_per_s"]
    out["meets_target"] = out["ratio_to_raw"] >= TARGET
    return out


def print_table(report: dict) -> None:
    """A small table: msg/s, GB/s, ratio to the raw hop, the forwarder's CPU per message."""
    print(
        f"{'transport':<10}{'path':<12}{'msg/s':>9}{'GB/s':>7}{'vs raw':>8}  forwarder CPU us/msg (user+sys)"
    )
    for transport, r in report["transports"].items():
        for path in PATHS:
            row = r[path]
            ratio = "" if path == "raw" else f"{row['msgs_per_s'] / r['raw']['msgs_per_s']:.0%}"
            cpu = row["cpu_us_per_msg"].get("forwarder")
            cpu_text = f"{cpu['user_us_per_msg']:.0f} + {cpu['sys_us_per_msg']:.0f}" if cpu else ""
            label = transport if path == "raw" else ""
            print(
                f"{label:<10}{path:<12}{row['msgs_per_s']:>9,.0f}{row['gb_per_s']:>7.2f}{ratio:>8}  {cpu_text}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--messages", type=int, default=16_000, help="sector messages per run (multiple of 4)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per transport and path (medians reported)"
    )
    parser.add_argument("--transports", default="tcp,ipc")
    parser.add_argument("--json", type=Path, default=RESULTS / "aggregator.json")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="bench-agg-")
    report: dict = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load1": os.getloadavg()[0]},
        "zmq": {"libzmq": zmq.zmq_version(), "pyzmq": zmq.__version__},
        "message_bytes": SECTOR_BYTES,
        "messages": args.messages,
        "repeats": args.repeats,
        "target_ratio": TARGET,
        "transports": {},
    }
    started = time.monotonic()
    try:
        for transport in args.transports.split(","):
            endpoints = endpoints_for(transport, tmp)
            runs: dict[str, list[dict]] = {path: [] for path in PATHS}
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits every path alike
                for path in PATHS:
                    runs[path].append(run_path(ctx, path, endpoints, args.messages))
            report["transports"][transport] = summarise(runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - started, 1)

    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"target: aggregator >= {TARGET:.0%} of the raw hop; {report['seconds']} s; results in {args.json}")


if __name__ == "__main__":
    main()
