"""Where CURVE's cost per GB goes, and its floor: libsodium's box against a plain ZeroMQ hop, side by side.

The encrypted hop (aggregator -> nodes) costs 2.6x the plain one per GB in bench_scaleout.py (target <= 2x).
This measures, in one process and one run, CPU seconds per GB of 165,888-byte sectors (the wire's payload):

1. `memcpy`: one copy of each sector (numpy), the cost of a single extra copy;
2. `box`: libsodium's crypto_box_afternm, the call libzmq 4.3.5's CurveZMQ makes per message, from the very
   libsodium that pyzmq's libzmq is linked against (loaded from pyzmq.libs with ctypes), on a padded buffer
   as libzmq prepares it (32 zero bytes + nonce space + the message);
3. `open`: crypto_box_open_afternm, what the receiving side pays;
4. `plain hop` / `curve hop`: a PUSH -> PULL pair over loopback TCP in this process (both ends' CPU, ZeroMQ's
   I/O threads included, from getrusage), the sender using copy=False as the aggregator does.

The floor of the ratio curve/plain for the sending side is (plain + box) / plain with box measured here: if
box alone costs as much as the plain hop, no change in stemstream can bring the encrypted hop under 2x.

Usage: python benchmarks/bench_curve_floor.py [--gb 1.0] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path

import numpy as np
import zmq

RESULTS = Path(__file__).parent / "results"
SECTOR = 144 * 576 * 2  # bytes of one sector's payload on the wire
ZEROBYTES = 32  # crypto_box_ZEROBYTES: the legacy API's zero padding, which libzmq's CurveZMQ uses
TARGET = 2.0


def _cpu() -> float:
    """CPU seconds (user + system) of this process, every thread included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sodium() -> ctypes.CDLL:
    """The libsodium that pyzmq's libzmq uses (bundled in pyzmq.libs), else the system's."""
    here = Path(zmq.__file__).parent
    found = sorted(glob.glob(str(here.parent / "pyzmq.libs" / "libsodium*.so*")))
    lib = ctypes.CDLL(found[0] if found else "libsodium.so.23")
    if lib.sodium_init() < 0:
        raise RuntimeError("sodium_init failed")
    return lib


def bench_memcpy(n: int) -> float:
    """CPU seconds for n copies of one sector."""
    src = np.random.default_rng(0).integers(0, 255, SECTOR, dtype=np.uint8)
    dst = np.empty_like(src)
    t0 = _cpu()
    for _ in range(n):
        np.copyto(dst, src)
    return _cpu() - t0


def bench_box(lib: ctypes.CDLL, n: int) -> tuple[float, float]:
    """CPU seconds for n boxes and n opens of one sector (crypto_box_afternm / _open_afternm)."""
    pk1, sk1 = ctypes.create_string_buffer(32), ctypes.create_string_buffer(32)
    pk2, sk2 = ctypes.create_string_buffer(32), ctypes.create_string_buffer(32)
    lib.crypto_box_keypair(pk1, sk1)
    lib.crypto_box_keypair(pk2, sk2)
    k_send, k_recv = ctypes.create_string_buffer(32), ctypes.create_string_buffer(32)
    lib.crypto_box_beforenm(k_send, pk2, sk1)
    lib.crypto_box_beforenm(k_recv, pk1, sk2)
    size = ZEROBYTES + SECTOR + 16  # libzmq boxes the flags byte and the message; +16 is ample
    plain = ctypes.create_string_buffer(size)
    ctypes.memmove(ctypes.addressof(plain) + ZEROBYTES, os.urandom(SECTOR), SECTOR)
    boxed, opened = ctypes.create_string_buffer(size), ctypes.create_string_buffer(size)
    nonce = ctypes.create_string_buffer(24)
    t0 = _cpu()
    for _ in range(n):
        if lib.crypto_box_afternm(boxed, plain, ctypes.c_ulonglong(size), nonce, k_send) != 0:
            raise RuntimeError("crypto_box_afternm failed")
    t_box = _cpu() - t0
    t0 = _cpu()
    for _ in range(n):
        if lib.crypto_box_open_afternm(opened, boxed, ctypes.c_ulonglong(size), nonce, k_recv) != 0:
            raise RuntimeError("crypto_box_open_afternm failed")
    return t_box, _cpu() - t0


def bench_hop(n: int, curve: bool) -> tuple[float, float]:
    """CPU seconds (both ends, I/O threads included) and wall seconds for n sectors over loopback TCP."""
    ctx = zmq.Context(io_threads=1)
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        pull.curve_server, pull.curve_secretkey = True, server_secret
        push.curve_publickey, push.curve_secretkey = client_public, client_secret
        push.curve_serverkey = server_public
    for s in (pull, push):
        s.linger = 0
        s.sndhwm = s.rcvhwm = 200
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    payload = np.random.default_rng(1).integers(0, 255, SECTOR, dtype=np.uint8)
    got = []

    def receive() -> None:
        for _ in range(n):
            if not pull.poll(30_000):
                break
            got.append(len(pull.recv(copy=False)))

    reader = threading.Thread(target=receive, daemon=True)
    push.send(payload, copy=False)  # the handshake and first message outside the timing
    pull.recv()
    reader.start()
    t0, w0 = _cpu(), time.perf_counter()
    for _ in range(n):
        push.send(payload, copy=False)
    reader.join(120)
    cpu, wall = _cpu() - t0, time.perf_counter() - w0
    push.close()
    pull.close()
    ctx.term()
    if len(got) != n:
        raise RuntimeError(f"{len(got)} of {n} messages arrived")
    return cpu, wall


def main() -> None:
    """Measure, print next to the target, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="GB of sectors per measurement")
    ap.add_argument("--json", type=Path, default=RESULTS / "curve_floor.json")
    args = ap.parse_args()
    n = max(100, int(args.gb * 1e9 / SECTOR))
    gb = n * SECTOR / 1e9
    lib = _sodium()
    t_copy = bench_memcpy(n)
    t_box, t_open = bench_box(lib, n)
    plain_cpu, plain_wall = bench_hop(n, curve=False)
    curve_cpu, curve_wall = bench_hop(n, curve=True)
    per_gb = {
        "memcpy": t_copy / gb,
        "box (encrypt)": t_box / gb,
        "open (decrypt)": t_open / gb,
        "plain hop, both ends": plain_cpu / gb,
        "curve hop, both ends": curve_cpu / gb,
    }
    floor = (plain_cpu + t_box + t_open) / plain_cpu
    overhead = curve_cpu - plain_cpu
    explained = (t_box + t_open + 4 * t_copy) / overhead if overhead > 0 else float("nan")
    load = os.getloadavg()[0]
    print(f"{n} sectors of {SECTOR} B ({gb:.2f} GB) per measurement; load average {load:.1f}")
    print(f"{'CPU-s per GB':<24} {'':>8}")
    for name, value in per_gb.items():
        print(f"{name:<24} {value:8.3f}")
    print(
        f"curve / plain hop, measured: {curve_cpu / plain_cpu:.2f}x (wall {plain_wall:.2f} s / {curve_wall:.2f} s)"
    )
    print(f"floor (plain + box + open) / plain: {floor:.2f}x  target <= {TARGET:.1f}x")
    print(f"box + open + 4 copies explain {explained:.0%} of the measured CURVE overhead")
    report = {
        "sector_bytes": SECTOR,
        "sectors": n,
        "gb": gb,
        "load_average": load,
        "cpu_s_per_gb": per_gb,
        "curve_over_plain": curve_cpu / plain_cpu,
        "floor_over_plain": floor,
        "explained_by_box_open_copies": explained,
        "target": TARGET,
        "zmq": zmq.zmq_version(),
        "machine": platform.processor() or platform.machine(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
