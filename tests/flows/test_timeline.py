"""The session timeline (flows/timeline.py, flows/timeline_phases.py), in-process: marks in order, the
children's ``timing:`` lines written through real logging and read back from their logs, the phases, and
timeline.json written beside the logs, never over an earlier one. (A real session's timeline is checked in
tests/flows/test_session.py's local session test.)"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from flows.timeline import (
    COMMAND,
    CONFIGURED,
    EXIT,
    FLOW_BEGINS,
    FLOW_ENDS,
    IMPORTS,
    PREFECT_IMPORTED,
    PREFECT_UP,
    PROCESS_START,
    SETTINGS,
    TIMELINE_FILE,
    Timeline,
    TimingTap,
    child_marks,
    child_started,
    load_timeline,
    process_start_wall,
)
from flows.timeline_phases import marks_table, phases, phases_table


@pytest.fixture
def child_log(tmp_path: Path):
    """Root logging into logs/node0.log, as a node streamer's stderr is; the tap removed afterwards."""
    logs = tmp_path / "logs"
    logs.mkdir()
    handler = logging.FileHandler(logs / "node0.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level, root.level = root.level, logging.INFO
    root.addHandler(handler)
    try:
        yield logs
    finally:
        for h in [h for h in root.handlers if isinstance(h, TimingTap) or h is handler]:
            root.removeHandler(h)
        handler.close()
        root.setLevel(level)


def test_process_start_is_this_process_start() -> None:
    start = process_start_wall()
    assert start is not None and start <= time.time()
    assert process_start_wall(os.getppid()) <= start  # the parent started first


def test_child_marks_come_from_its_log_through_real_logging(child_log: Path) -> None:
    child_started()
    logging.getLogger("streaming.node.workers.pool").info(
        "%d counting worker(s) started and warmed up in %.2f s", 2, 0.5
    )
    logging.getLogger("streaming.node.uplink").info("%s: welcomed as node %d of %d", "n", 0, 2)
    logging.getLogger("streaming.node.uplink").info("%s: welcomed as node %d of %d", "n", 0, 2)  # once
    with open(child_log / "node0.log", "a") as f:
        f.write('x timing: {"mark": "torn", "wa\n')  # a line cut by a kill: skipped, not fatal
    marks = child_marks(child_log)
    assert [m.name for m in marks] == [PROCESS_START, IMPORTS, "kernels warmed", "joined"]
    assert {m.process for m in marks} == {"node0"}
    assert [m.wall for m in marks] == sorted(m.wall for m in marks)


def _session_timeline(logs: Path) -> Timeline:
    """A session's marks as the CLI and the flow make them, with a node's lines in its log."""
    t = Timeline()
    now = time.time()
    for i, (process, name) in enumerate(
        [
            ("cli", PROCESS_START), ("cli", COMMAND), ("cli", SETTINGS), ("cli", PREFECT_IMPORTED),
            ("cli", PREFECT_UP), ("session", FLOW_BEGINS), ("session", "allocate nodes start"),
            ("session", "allocate nodes end"), ("session", "arm aggregator start"),
            ("session", "arm aggregator end"), ("session", "wait nodes ready start"),
            ("session", "wait nodes ready end"), ("session", "ready"), ("session", "scan 1 first data"),
            ("session", "scan 1 last data"), ("session", "scan 1 written"), ("session", "scan 1 verified"),
            ("session", "last scan taken"), ("session", "analyses done"), ("session", "release start"),
            ("session", "release end"), ("session", FLOW_ENDS), ("cli", "session printed"), ("cli", EXIT),
        ]
    ):  # fmt: skip
        t.mark(name, wall=now + i, process=process)
    lines = [(PROCESS_START, 6.1), (COMMAND, 6.3), (IMPORTS, 7.5), (CONFIGURED, 8.0), ("kernels warmed", 9.0)]
    lines += [("joined", 10.5)]
    (logs / "node0.log").write_text(
        "".join(f'INFO stemstream.timing: timing: {{"mark": "{n}", "wall": {now + s}}}\n' for n, s in lines)
    )
    return t


def test_phases_in_session_order_and_the_file_is_written_never_over_another(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    t = _session_timeline(logs)
    path = t.write(logs)
    assert path == logs / TIMELINE_FILE
    data = json.loads(path.read_text())
    assert [m["t"] for m in data["marks"]] == sorted(m["t"] for m in data["marks"])
    assert data["marks"][0]["name"] == PROCESS_START and data["marks"][-1]["name"] == EXIT
    assert {"node0"} <= {m["process"] for m in data["marks"]}

    got = dict(phases(load_timeline(path)))
    names = list(got)
    assert names.index("Prefect server start") < names.index("launch nodes") < names.index("start -> ready:")
    assert names.index("start -> ready:") < names.index("scan 1: to first data") < names.index("total")
    assert got["total"] == pytest.approx(23.0)
    assert got["start -> ready:"] == pytest.approx(12.0)
    assert got["node: start -> joined"] == pytest.approx(4.4)
    assert got["node: the node's imports"] == pytest.approx(1.2)
    assert got["node: counting workers + warm-up"] == pytest.approx(1.0)

    again = t.write(logs)  # a second write never replaces the first, nor doubles the children's marks
    assert again == logs / "timeline-1.json" and path.read_text() == json.dumps(data, indent=1) + "\n"
    assert len(json.loads(again.read_text())["marks"]) == len(data["marks"])

    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(marks_table(t), phases_table(phases(t)))
    text = console.export_text()
    assert "joined" in text and "start -> ready:" in text
