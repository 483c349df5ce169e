"""The node's sector intake on a real ZeroMQ pair (ROUTER -> DEALER, as aggregator -> node): payloads land
byte-exact in their slots, and every kind of bad message is counted as the whole-message path counts it,
without a byte of it reaching a counted frame and without the stream losing step."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from counting.geometry import N_SECTORS, SECTOR_BYTES, SECTOR_ROWS
from streaming.node.assembly import FrameAssembler, Sealed
from streaming.node.config import NodeCounters
from streaming.node.hold_queue import HoldQueue
from streaming.node.intake import SectorIntake, rest_of_message
from streaming.node.scan import NodeScan
from streaming.node.workers.slots import SlotMemory
from streaming.protocol import control as p
from streaming.protocol.sector import SectorHeader

SIDE = 4


def header(frame: int, module: int, scan: int = 1, side: int = SIDE) -> bytes:
    return SectorHeader(scan, frame, 9, side, side, frame % side, frame // side, 0, module).encode()


def sector(value: int, size: int = SECTOR_BYTES) -> bytes:
    return np.full(size // 2, value, "<u2").tobytes() + b"\x07" * (size % 2)


class Node:
    """An intake with its own slots (2 slots of 2 frames), fed through a real socket pair."""

    def __init__(self, ctx: zmq.Context, name: str) -> None:
        self.router, self.dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        self.router.bind(f"inproc://{name}")
        self.dealer.setsockopt(zmq.IDENTITY, b"n")
        self.dealer.connect(f"inproc://{name}")
        self.memory = SlotMemory(2, 2, shared=False)
        self.assembler = FrameAssembler(self.memory.slots())
        self.counters, self.held, self.sealed = NodeCounters(), HoldQueue(4), []
        self.intake = SectorIntake(self.assembler, self.counters, self.held, self.sealed.append)
        begin = p.ScanBegin(
            scan_number=1, scan_width=SIDE, scan_height=SIDE, expected_frames=SIDE * SIDE, node_index=0,
            n_nodes=1, session_id=1,
        )  # fmt: skip
        self.scan = NodeScan(begin)
        self.assembler.begin_scan(1)

    def feed(self, *parts: bytes) -> None:
        """One message through the socket and the intake, as the node's loop reads it."""
        self.router.send_multipart([b"n", *parts])
        kind = self.dealer.recv()
        if kind == p.DATA:
            self.intake.receive(self.dealer, self.scan)
        else:
            assert rest_of_message(self.dealer, kind)[0] == kind

    def rows(self, sealed: Sealed) -> dict[int, np.ndarray]:
        """Frame number -> its frame, of a sealed slot."""
        slot = self.assembler.slot(sealed.slot)
        return {int(slot.frame_numbers[r]): slot.frames[r] for r in range(sealed.frames)}

    def close(self) -> None:
        self.router.close(0)
        self.dealer.close(0)
        self.memory.close()


@pytest.fixture(scope="module")
def ctx():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def node(ctx, request):
    n = Node(ctx, request.node.name)
    yield n
    n.close()


def test_sectors_land_byte_exact_and_bad_messages_are_counted_not_placed(node: Node) -> None:
    for module in range(N_SECTORS):
        node.feed(p.DATA, header(0, module), sector(10 + module))
    node.feed(p.DATA, header(1, 0), sector(99, SECTOR_BYTES - 2))  # short: malformed, no row for frame 1
    node.feed(p.DATA, header(1, 0), sector(98, SECTOR_BYTES + 64))  # long: truncated, malformed
    node.feed(p.DATA, header(1, 1), sector(97), b"extra")  # four parts
    node.feed(p.DATA, header(1, 2))  # no payload
    node.feed(p.DATA)  # nothing but the kind
    node.feed(p.DATA, b"\xc1garbage", sector(96))  # not a header
    node.feed(p.DATA, header(1, 3, side=SIDE * 2), sector(95))  # another scan size
    node.feed(p.DATA, header(1, 3, scan=7, side=SIDE * 2), sector(94, 10))  # stray, but malformed first
    assert (node.counters.malformed, node.counters.stray, node.counters.sectors) == (8, 0, 4)
    node.feed(p.DATA, header(1, 3, scan=7), sector(93))  # of no open scan
    for module in (0, 2, 3):  # frame 1 lacks module 1, whose place had the four-part message's bytes
        node.feed(p.DATA, header(1, module), sector(20 + module))
    node.feed(p.DATA, header(1, 0), sector(92))  # a repeat of a placed sector: dropped, counted
    assert (node.counters.stray, node.counters.sectors, node.assembler.duplicates) == (1, 8, 1)
    assert node.sealed == [] and len(node.held) == 0
    sealed = node.assembler.flush()
    frames = node.rows(sealed[0])
    assert sorted(frames) == [0, 1]
    for module in range(N_SECTORS):
        rows = slice(module * SECTOR_ROWS, (module + 1) * SECTOR_ROWS)
        assert (frames[0][rows] == 10 + module).all()
        assert (frames[1][rows] == (0 if module == 1 else 20 + module)).all()
    assert node.assembler.slot(sealed[0].slot).masks[:2].tolist() == [0b1111, 0b1101]


def test_a_sector_with_no_free_slot_is_held_whole_and_placed_later(node: Node) -> None:
    for frame in range(4):  # both slots' rows taken by frames waiting for their other sectors
        node.feed(p.DATA, header(frame, 0), sector(frame + 1))
    node.feed(p.DATA, header(4, 1), sector(44))
    node.feed(p.DATA, header(5, 1), sector(55, SECTOR_BYTES + 2))  # malformed, so never held
    assert len(node.held) == 1 and node.counters.malformed == 1 and node.counters.sectors == 4
    for frame in range(2):  # slot 0 completes, is sealed, and (counted) is released
        for module in range(1, N_SECTORS):
            node.feed(p.DATA, header(frame, module), sector(frame + 1))
    assert [s.frames for s in node.sealed] == [2]
    node.assembler.release(node.sealed[0].slot)
    node.held.replay(lambda parts: node.intake.place(parts, node.scan, hold=True), lambda *_: None)
    assert len(node.held) == 0 and node.counters.sectors == 11
    sealed = node.assembler.flush()
    frame4 = {f: a for s in sealed for f, a in node.rows(s).items()}[4]
    # Its row held frame 0 before: the sectors frame 4 lacks read as zero, never as frame 0's data.
    assert (frame4[SECTOR_ROWS : 2 * SECTOR_ROWS] == 44).all() and not frame4[:SECTOR_ROWS].any()
    assert not frame4[2 * SECTOR_ROWS :].any()


def test_control_messages_are_read_whole(node: Node) -> None:
    node.feed(p.END, b"body", b"more")
    node.feed(p.DATA, header(0, 0), sector(1))
    assert node.counters.sectors == 1 and node.counters.malformed == 0
