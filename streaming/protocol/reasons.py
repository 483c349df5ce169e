"""Why a scan ended, and what the aggregator makes of a sector of another scan than the open one.

Both are StrEnums whose values are the strings on the wire (``ScanEnd.reason``, ``Done.reason``,
``NodeScanDone.reason``, the forwarders' ``Drop.why``) and in stop records, so a decoded message's plain
string compares equal to its member.
"""

from __future__ import annotations

from enum import StrEnum


class EndReason(StrEnum):
    """How a scan ended (the aggregator's reasons, then a node's own)."""

    COMPLETE = "complete"  # every expected sector arrived
    DEADLINE = "deadline"  # scan_deadline passed without a sector of it
    SUPERSEDED = "superseded"  # a sector of a newer scan came first
    SHUTDOWN = "shutdown"  # the aggregator stopped mid-scan
    AGGREGATOR_STOPPED = "aggregator-stopped"  # a node heard the aggregator's bye mid-scan
    FORWARDER_LOST = "forwarder-lost"  # a forwarding process's end never came to the node
    NODE_DEADLINE = "node-deadline"  # the node heard nothing from the aggregator for node_deadline


class Verdict(StrEnum):
    """What a sector of another scan than the open one does (streaming.aggregator.admission)."""

    NEW = "new"  # it begins a new scan: now if every node is armed, else once they are
    BEGUN = "begun"  # a new scan began with it
    HELD = "held"  # it waits until every node is armed
    REFUSED = "refused"  # its scan began before the session was first ready
    LATE = "late"  # its scan ended less than scan_deadline ago
