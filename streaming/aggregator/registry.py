"""The aggregator's view of its nodes: who joined under which index, who is connected and armed, and which
node hosts the session's scan writer (the roles every node learns from its welcome).

Rules, in the order they are applied to a hello:
  * another protocol version: refused;
  * a node started with another output directory than the writer host's: refused (its scans would go
    somewhere else, or a second writer would write the same names);
  * a known name (a reconnect): same index again, but only once the connection that name is bound to is
    gone (lost: disconnected, stalled or silent past ``node_timeout``); until then a hello under that name
    from another connection is refused (not finally: a restarted node asks again until its old self is
    noticed lost), so no connection takes over another's name;
  * otherwise the lowest free index; a free index is one never taken, or one whose node is gone
    (disconnected, or silent past ``node_timeout``) so a restarted node takes its place; none free:
    refused, naming the limit (not finally: the node asks again until the node it replaces is noticed
    lost, then gives up with that reason).
The writer host is designated once: a node that already hosts a writer (after an aggregator restart) is
adopted, otherwise the first node to join (index 0) is asked to host it. If that node is lost the role is
free again, and the next node to join (a restarted node 0) hosts a new writer; every node is then told the
new address.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from streaming.protocol import control as p

log = logging.getLogger(__name__)


@dataclass
class NodeEntry:
    """One node of the session."""

    name: str
    index: int
    identity: bytes
    output_dir: str = ""
    connected: bool = True
    ready: bool = False
    last_seen: float = 0.0
    probed: float = 0.0  # when the aggregator last checked that its connection is still there


@dataclass
class WriterRole:
    """Who hosts the scan writer, and where it listens ("" until announced)."""

    name: str
    output_dir: str
    address: str = ""


class NodeRegistry:
    """Nodes by identity, name and index, and the writer role."""

    def __init__(self, n_nodes: int) -> None:
        self.n_nodes = n_nodes
        self.by_identity: dict[bytes, NodeEntry] = {}
        self.by_name: dict[str, NodeEntry] = {}
        self.by_index: dict[int, NodeEntry] = {}
        self.writer: WriterRole | None = None

    def refusal(self, hello: p.Hello, identity: bytes) -> p.Bye | None:
        """Why this hello (from the connection ``identity``) cannot join (the bye to send), or None."""
        if hello.protocol != p.PROTOCOL_VERSION:
            return p.Bye(f"it speaks protocol {hello.protocol}, the aggregator {p.PROTOCOL_VERSION}")
        known = self.by_name.get(hello.name)
        if known is not None and known.connected and known.identity != identity:
            return p.Bye(
                f"node {hello.name} is connected already (another connection); a restarted node is let in "
                "once its old connection is noticed lost",
                final=False,
            )
        w = self.writer
        if w is not None and w.name != hello.name and hello.output_dir and w.output_dir != hello.output_dir:
            return p.Bye(
                f"it was started with --output-dir {hello.output_dir}, but this session's scans go to "
                f"{w.output_dir} (written by {w.name}); start every node with the same command"
            )
        if hello.name not in self.by_name and self._free_index() is None:
            # Not final: a node that was just restarted may be waiting for its old self to be noticed lost.
            return p.Bye(
                f"all {self.n_nodes} node slots are taken (the aggregator was started with --nodes "
                f"{self.n_nodes}); stop a node or restart the aggregator with more",
                final=False,
            )
        return None

    def join(self, identity: bytes, hello: p.Hello) -> NodeEntry:
        """Add or re-bind the node of an accepted hello (call refusal first)."""
        node = self.by_name.get(hello.name)
        if node is None:
            index = self._free_index()
            old = self.by_index.get(index)
            if old is not None:  # a lost node's place, taken by a restarted one
                log.info("node %s takes the place of lost node %s (index %d)", hello.name, old.name, index)
                self.by_name.pop(old.name, None)
                self.by_identity.pop(old.identity, None)
            node = NodeEntry(hello.name, index, identity, hello.output_dir)
            self.by_name[node.name] = node
            self.by_index[index] = node
        self.rebind(node, identity)
        node.ready = False  # a (re)started node arms again with ready
        return node

    def designate_writer(self, node: NodeEntry) -> bool:
        """Make node the writer host if the role is free; True when it must start a writer."""
        if self.writer is None:
            self.writer = WriterRole(node.name, node.output_dir)
            return True
        return False

    def writer_at(self, node: NodeEntry, message: p.WriterAt) -> bool:
        """A node announces its writer; True when the session's writer address changed."""
        w = self.writer
        if w is None:  # a node that kept its writer across an aggregator restart
            self.writer = w = WriterRole(node.name, message.output_dir)
        if w.name != node.name or w.address == message.address:
            return False
        w.address = message.address
        log.info("scan writer of this session: %s on %s, writing to %s", w.address, w.name, w.output_dir)
        return True

    def hosts_writer(self, node: NodeEntry) -> bool:
        """True for the writer host."""
        return self.writer is not None and self.writer.name == node.name

    def lose(self, node: NodeEntry) -> None:
        """Mark a node gone; if it hosted the writer, the role is free for the next node to join."""
        node.connected = node.ready = False
        if self.hosts_writer(node):
            log.warning("node %s hosted the scan writer: the next node to join hosts a new one", node.name)
            self.writer = None

    def node_for(self, identity: bytes, name: str | None) -> NodeEntry | None:
        """The node behind an identity; a known name on a new identity is that node reconnected, but only
        when its old connection is gone (lost): a name is never taken from a live connection."""
        node = self.by_identity.get(identity)
        if node is None and name is not None:
            known = self.by_name.get(name)
            if known is not None and not known.connected:
                self.rebind(known, identity)
                node = known
        return node

    def rebind(self, node: NodeEntry, identity: bytes) -> None:
        """Point node at its current connection."""
        if node.identity != identity:
            self.by_identity.pop(node.identity, None)
            node.identity = identity
        self.by_identity[identity] = node
        node.connected = True

    def all_ready(self, started: bool = False) -> bool:
        """Every one of the N nodes connected and armed; once the session has started (``started``), every
        connected node armed (at least one): a lost node does not stop the session."""
        nodes = list(self.by_index.values())
        if not started:
            return len(nodes) == self.n_nodes and all(n.connected and n.ready for n in nodes)
        live = [n for n in nodes if n.connected]
        return bool(live) and all(n.ready for n in live)

    def identity(self, index: int) -> bytes | None:
        """Node index's connection now (a node can reconnect while a send to it waits); None: gone."""
        node = self.by_index.get(index)
        return node.identity if node is not None and node.connected else None

    def disarm(self) -> None:
        """A scan began: the arm is used up, each node re-arms after its done."""
        for node in self.by_index.values():
            node.ready = False

    def routes(self) -> list[tuple[int, str]]:
        """The connected nodes, (index, name), in index order: what frames are routed over."""
        return [(i, n.name) for i, n in sorted(self.by_index.items()) if n.connected]

    def _free_index(self) -> int | None:
        for i in range(self.n_nodes):
            node = self.by_index.get(i)
            if node is None or not node.connected:
                return i
        return None
