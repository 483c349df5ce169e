"""Shared by the transport benchmarks (bench_aggregator, bench_scaleout): one scan's sectors pushed
zero-copy as the receivers would, a process's CPU time, and the inbox of the children's reports."""

from __future__ import annotations

import multiprocessing as mp
import resource
from typing import Any

import numpy as np
import zmq

from counting.geometry import N_SECTORS, SECTOR_BYTES
from streaming.protocol.sector import SectorHeader


def process_cpu() -> tuple[float, float]:
    """User and system CPU seconds of this process, all threads (libzmq's I/O threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def scan_headers(messages: int) -> list[bytes]:
    """Encoded headers of one valid scan of messages // 4 frames (modules interleaved, frame order)."""
    frames = messages // N_SECTORS
    width = next(w for w in range(int(frames**0.5), 0, -1) if frames % w == 0)
    return [
        SectorHeader(1, f + 1, frames, width, frames // width, f % width, f // width, 0, m).encode()
        for f in range(frames)
        for m in range(N_SECTORS)
    ]


def push_scan(
    endpoints: str, messages: int, start: Any, *, hwm: int, timeout: float, io_threads: int = 1
) -> tuple[int, tuple[float, float]]:
    """Push one scan's sectors to every address of a comma-separated list (ZeroMQ spreads them) once start
    is set; returns the messages sent and the CPU seconds (user, system) the sending took."""
    ctx = zmq.Context(io_threads=io_threads)
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = hwm
    sock.linger = -1
    for address in endpoints.split(","):
        sock.connect(address)
    headers = scan_headers(messages)  # encoded up front: the production receivers are C++, sending is cheap
    pool = [np.full(SECTOR_BYTES, i, np.uint8) for i in range(8)]
    start.wait(timeout)
    since = process_cpu()
    for i, header in enumerate(headers):
        sock.send_multipart([header, pool[i & 7]], copy=False)
    sock.close()
    ctx.term()  # linger -1: returns when everything is handed to the kernel
    return len(headers), tuple(now - then for now, then in zip(process_cpu(), since))


class Inbox:
    """Messages (key, value) from the children, by key, in whatever order they come."""

    def __init__(self, queue: mp.Queue, timeout: float) -> None:
        self.queue, self.timeout = queue, timeout
        self.got: dict[str, object] = {}

    def get(self, key: str) -> object:
        """The value reported under key, waiting up to timeout for each message."""
        while key not in self.got:
            name, value = self.queue.get(timeout=self.timeout)
            self.got[name] = value
        return self.got[key]
