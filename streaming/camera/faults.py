"""Fault injection for the emulated receivers (options for tests, never patches).

A sender can drop chosen (frame_number, module) sectors and interleave garbage messages, spread evenly over
the scan, cycling through every malformed kind in GARBAGE_KINDS; each kind fails exactly one wire check.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from counting.geometry import N_SECTORS
from streaming.camera.sources import ScanInfo

GARBAGE_KINDS = (
    "one_part",  # the header alone
    "three_parts",  # an extra part after the payload
    "bad_msgpack",  # the header is not msgpack
    "short_header",  # a msgpack array of 3 ints
    "payload_size",  # a 1,000-byte payload
    "field_range",  # module 4 (0..3 allowed)
    "position",  # x outside the scan width
)


@dataclass(frozen=True)
class SenderFaults:
    """Faults to inject: sectors to drop and garbage messages to interleave (per module sender)."""

    drop: frozenset[tuple[int, int]] = frozenset()  # (frame_number, module) pairs never sent
    garbage: int = 0  # malformed messages each module sender interleaves, cycling through GARBAGE_KINDS

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop", frozenset((int(f), int(m)) for f, m in self.drop))
        if self.garbage < 0:
            raise ValueError(f"garbage must be >= 0, got {self.garbage}")


def garbage_message(kind: str, info: ScanInfo, frame_number: int, module: int, payload: bytes) -> list[bytes]:
    """One malformed message of the given kind (each fails exactly one wire check)."""
    fields = [info.scan_number, frame_number, info.frames, info.width, info.height, 0, 0, 0, module]
    header = msgpack.packb(fields)
    if kind == "one_part":
        return [header]
    if kind == "three_parts":
        return [header, payload, b"extra"]
    if kind == "bad_msgpack":
        return [b"\xc1 not msgpack", payload]  # 0xc1 is never valid msgpack
    if kind == "short_header":
        return [msgpack.packb(fields[:3]), payload]
    if kind == "payload_size":
        return [header, payload[:1000]]
    if kind == "field_range":
        return [msgpack.packb(fields[:8] + [N_SECTORS]), payload]
    if kind == "position":
        return [msgpack.packb(fields[:5] + [info.width] + fields[6:]), payload]
    raise ValueError(f"unknown garbage kind {kind!r}")


def garbage_slots(count: int, frames: int) -> dict[int, int]:
    """After which real sector (ordinal) each garbage message goes, spread over the scan: {ordinal: n}."""
    slots: dict[int, int] = {}
    for k in range(count):
        at = ((k + 1) * frames) // (count + 1)
        slots[at] = slots.get(at, 0) + 1
    return slots
