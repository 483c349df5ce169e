"""The aggregator's side of its forwarding processes: starts K - 1 of them (multiprocessing, spawn), waits
until each is bound, and talks to them over one internal ROUTER on loopback (streaming.protocol.paths).
Plain plumbing: what a message means is the aggregator's business.

The hub accepts messages only from the connections its own forwarders said ``f.up`` on (an ``Up`` whose
pid is the process it started), each only under that forwarder's index; anything else on the loopback
socket (another local process) is counted in ``refused`` and dropped."""

from __future__ import annotations

import logging
import multiprocessing
import time
from contextlib import suppress
from dataclasses import dataclass

import zmq

from counting.errors import PermanentError
from streaming.aggregator.config import AggregatorConfig
from streaming.aggregator.forwarder import run_forwarder
from streaming.protocol import paths as f
from streaming.transport.addresses import offset_address, port_of
from streaming.transport.ratelog import RateLimitedLog
from streaming.transport.security import CurveServerConfig

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for every forwarder to bind (a spawned interpreter imports numpy and zmq)


class ForwarderError(PermanentError, RuntimeError):
    """A forwarding process could not start."""


@dataclass
class ForwarderInfo:
    """One forwarding process as the aggregator knows it."""

    index: int
    process: multiprocessing.process.BaseProcess
    receivers: list[str]
    nodes: str = ""
    alive: bool = True
    identity: bytes = b""  # its connection on the hub socket

    @property
    def port(self) -> int:
        """Its node socket's port."""
        return port_of(self.nodes)


def check_addresses(config: AggregatorConfig) -> None:
    """Every address the K paths bind, distinct (port 0 aside): a clear error before anything starts."""
    path = config.path
    wanted = [("monitor_bind", config.monitor_bind)] if config.monitor_bind else []
    for i in range(config.processes):
        delta = i * path.port_stride
        wanted += [
            (f"receiver {j} of path {i}", offset_address(a, delta)) for j, a in enumerate(path.receivers)
        ]
        wanted.append((f"nodes_bind of path {i}", offset_address(path.nodes_bind, delta)))
    seen: dict[str, str] = {}
    for what, address in wanted:
        if address.endswith(":0"):
            continue
        if address in seen:
            raise ForwarderError(
                f"{what} would bind {address}, already the {seen[address]}: forwarding process i binds every "
                f"receiver and the node address at port + i x {path.port_stride} "
                "(streaming.aggregator_port_stride); choose ports or a stride that do not collide"
            )
        seen[address] = what


class ForwarderHub:
    """Starts, addresses and stops the forwarding processes 1..K-1."""

    def __init__(
        self, config: AggregatorConfig, curve: CurveServerConfig | None, context: zmq.Context
    ) -> None:
        check_addresses(config)
        self.socket = context.socket(zmq.ROUTER)
        self.socket.linger = 1000
        self.socket.router_mandatory = 1
        self.socket.bind("tcp://127.0.0.1:0")
        address = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.forwarders: dict[int, ForwarderInfo] = {}
        self._by_identity: dict[bytes, int] = {}  # each forwarder's connection -> its index
        self.refused = 0  # messages from a connection that is not one of ours, or under another's index
        self.lost: dict[int, str] = {}  # forwarding processes that exited: index -> why (for monitors)
        self.malformed = 0
        self._log = RateLimitedLog(log)
        spawn = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        try:
            for i in range(1, config.processes):
                proc = spawn.Process(
                    target=run_forwarder,
                    args=(config, curve, i, address, level),
                    name=f"stemstream-forwarder-{i}",
                    daemon=True,
                )
                proc.start()
                receivers = [offset_address(a, i * config.path.port_stride) for a in config.path.receivers]
                self.forwarders[i] = ForwarderInfo(i, proc, receivers)
            self._wait_up()
        except BaseException:
            self.stop()
            raise

    def _wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = set(self.forwarders)
        while waiting:
            left = deadline - time.monotonic()
            dead = [i for i in waiting if not self.forwarders[i].process.is_alive()]
            if dead or left <= 0:
                code = self.forwarders[dead[0]].process.exitcode if dead else None
                why = (
                    f"exited with code {code} (its error is logged above)"
                    if dead
                    else f"did not start in {START_TIMEOUT:g} s"
                )
                raise ForwarderError(f"forwarding process {(dead or sorted(waiting))[0]} {why}")
            if not self.socket.poll(int(min(left, 0.5) * 1000)):
                continue
            identity, *parts = self.socket.recv_multipart()
            message = self._decode(parts)
            if (
                isinstance(message, f.Up)
                and message.index in waiting
                and message.pid == self.forwarders[message.index].process.pid  # ours, not a local stranger
                and identity not in self._by_identity
            ):
                info = self.forwarders[message.index]
                info.receivers, info.nodes = list(message.receivers), message.nodes
                info.identity = identity
                self._by_identity[identity] = message.index
                waiting.discard(message.index)
            elif message is not None and identity not in self._by_identity:
                self._refuse(message)
        log.info(
            "%d forwarding process(es) up: %s",
            len(self.forwarders),
            ", ".join(f"{i}: pid {x.process.pid}, nodes {x.nodes}" for i, x in self.forwarders.items()),
        )

    @property
    def data_ports(self) -> list[int]:
        """The node ports of the live forwarders, in order."""
        return [x.port for x in self.forwarders.values() if x.alive]

    def alive_indices(self) -> list[int]:
        """Forwarders still running (checks the processes)."""
        for x in self.forwarders.values():
            if x.alive and not x.process.is_alive():
                x.alive = False
                self.lost[x.index] = (
                    f"forwarding process {x.index} (pid {x.process.pid}) exited with {x.process.exitcode}"
                )
                log.error(
                    "forwarding process %d (pid %s) exited with %s: its queued sectors are lost; the others "
                    "carry on",
                    x.index,
                    x.process.pid,
                    x.process.exitcode,
                )
        return [i for i, x in self.forwarders.items() if x.alive]

    def tell(self, message: object) -> None:
        """Send a message to every live forwarder."""
        for x in self.forwarders.values():
            if x.alive:
                try:
                    self.socket.send_multipart([x.identity, *f.encode(message)], zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    log.warning("forwarder %d did not take %s: %s", x.index, type(message).__name__, exc)

    def receive(self) -> list[object]:
        """Every message waiting (decoded; malformed ones logged and dropped)."""
        out = []
        for _ in range(256):
            try:
                identity, *parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            index = self._by_identity.get(identity)
            message = self._decode(parts) if index is not None else None
            if index is None:
                self.refused += 1
                self._log("hub message refused", "from a connection that is not one of its forwarders")
            elif message is not None and getattr(message, "index", index) != index:
                self._refuse(message)
            elif message is not None:
                out.append(message)
        return out

    def _decode(self, parts: list[bytes]) -> object | None:
        try:
            return f.decode(parts)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the aggregator
            self.malformed += 1
            self._log("bad forwarder message dropped", "%s: %s", type(exc).__name__, exc)
            return None

    def _refuse(self, message: object) -> None:
        self.refused += 1
        self._log(
            "hub message refused",
            "%s (index %s) from a connection not bound to that forwarder",
            type(message).__name__,
            getattr(message, "index", "?"),
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Tell every forwarder to stop, wait for it (bounded), then kill what is left; idempotent."""
        for x in self.forwarders.values():
            if x.identity and x.process.is_alive():
                with suppress(zmq.ZMQError):
                    self.socket.send_multipart([x.identity, *f.encode(f.Stop())], zmq.NOBLOCK)
        deadline = time.monotonic() + timeout
        for x in self.forwarders.values():
            x.process.join(max(0.0, deadline - time.monotonic()))
            if x.process.is_alive():
                x.process.kill()
                x.process.join(2.0)
            x.alive = False
        self.socket.close(linger=0)
