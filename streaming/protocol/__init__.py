"""The wire vocabulary: sector frames, control messages, live snapshots, stop records, end reasons.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "AggregatorState": "streaming.protocol.control",
    "ProtocolError": "streaming.protocol.control",
    "decode": "streaming.protocol.control",
    "encode": "streaming.protocol.control",
    "EndReason": "streaming.protocol.reasons",
    "Verdict": "streaming.protocol.reasons",
    "ScanRecord": "streaming.protocol.record",
    "ScanStatus": "streaming.protocol.record",
    "record_path": "streaming.protocol.record",
    "SectorHeader": "streaming.protocol.sector",
    "WireError": "streaming.protocol.sector",
    "decode_message": "streaming.protocol.sector",
}
__all__ = [
    "AggregatorState",
    "decode",
    "decode_message",
    "encode",
    "EndReason",
    "ProtocolError",
    "record_path",
    "ScanRecord",
    "ScanStatus",
    "SectorHeader",
    "Verdict",
    "WireError",
]

if TYPE_CHECKING:
    from streaming.protocol.control import AggregatorState, ProtocolError, decode, encode
    from streaming.protocol.reasons import EndReason, Verdict
    from streaming.protocol.record import ScanRecord, ScanStatus, record_path
    from streaming.protocol.sector import SectorHeader, WireError, decode_message


__getattr__ = lazy_exports(__name__, _WHERE)
