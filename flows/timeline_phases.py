"""A session timeline's phases (seconds between two marks: where the start-up goes) and its tables.

Pure computation on flows.timeline's marks, and the rich tables `stemstream session --timings` prints;
benchmarks/bench_startup.py takes the median of each phase over runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich.table import Table

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
    Mark,
    Timeline,
)

# The session's own steps (process "session"): begin and end marks of each.
ALLOCATE, ARM, WAIT_READY, RELEASE = "allocate nodes", "arm aggregator", "wait nodes ready", "release"
READY = "ready"
ANALYSES_DONE = "analyses done"
SUMMARY = "summary"
CLI_DONE = "session printed"

# (phase, (process, mark) it starts at, (process, mark) it ends at); a process ending in "*" means every
# child of that kind (node0, node1, ...): the phase is the slowest of them.
STARTUP_PHASES: tuple[tuple[str, tuple[str, str], tuple[str, str]], ...] = (
    ("python start + imports (CLI)", ("cli", PROCESS_START), ("cli", COMMAND)),
    ("settings", ("cli", COMMAND), ("cli", SETTINGS)),
    ("import prefect", ("cli", SETTINGS), ("cli", PREFECT_IMPORTED)),
    ("Prefect server start", ("cli", PREFECT_IMPORTED), ("cli", PREFECT_UP)),
    ("flow run start", ("cli", PREFECT_UP), ("session", FLOW_BEGINS)),
    ("session set-up (dark, plan)", ("session", FLOW_BEGINS), ("session", f"{ALLOCATE} start")),
    ("launch nodes", ("session", f"{ALLOCATE} start"), ("session", f"{ALLOCATE} end")),
    ("arm aggregator", ("session", f"{ARM} start"), ("session", f"{ARM} end")),
    ("wait for nodes ready", ("session", f"{WAIT_READY} start"), ("session", f"{WAIT_READY} end")),
    ("node: python start + CLI imports", ("node*", PROCESS_START), ("node*", COMMAND)),
    ("node: the node's imports", ("node*", COMMAND), ("node*", IMPORTS)),
    ("node: settings, config, dark", ("node*", IMPORTS), ("node*", CONFIGURED)),
    ("node: counting workers + warm-up", ("node*", CONFIGURED), ("node*", "kernels warmed")),
    ("node: warmed -> joined", ("node*", "kernels warmed"), ("node*", "joined")),
    ("node: start -> joined", ("node*", PROCESS_START), ("node*", "joined")),
    ("aggregator: python start + CLI imports", ("aggregator", PROCESS_START), ("aggregator", COMMAND)),
    ("aggregator: its imports", ("aggregator", COMMAND), ("aggregator", IMPORTS)),
    ("aggregator: imports -> bound", ("aggregator", IMPORTS), ("aggregator", "bound")),
    ("view: start -> page up", ("view", PROCESS_START), ("view", "page up")),
    ("start -> ready:", ("cli", PROCESS_START), ("session", READY)),
)
END_PHASES = (
    ("analyses after the last scan", ("session", "last scan taken"), ("session", ANALYSES_DONE)),
    ("release (stop processes)", ("session", f"{RELEASE} start"), ("session", f"{RELEASE} end")),
    ("summary", ("session", f"{RELEASE} end"), ("session", FLOW_ENDS)),
    ("flow end -> CLI done (summary printed)", ("session", FLOW_ENDS), ("cli", CLI_DONE)),
    ("CLI done -> exit (Prefect server stop)", ("cli", CLI_DONE), ("cli", EXIT)),
    ("total", ("cli", PROCESS_START), ("cli", EXIT)),
)
_SCAN = re.compile(r"scan (\d+) (first data|last data|written|verified)$")


def _times(marks: Iterable[Mark], process: str, name: str) -> dict[str, float]:
    """Wall time of a mark in each matching process (its first occurrence)."""
    found: dict[str, float] = {}
    for m in marks:
        matches = m.process.startswith(process[:-1]) if process.endswith("*") else m.process == process
        if matches and m.name == name and m.process not in found:
            found[m.process] = m.wall
    return found


def _phase(marks: list[Mark], begin: tuple[str, str], end: tuple[str, str]) -> float | None:
    """Seconds from begin to end; per child process (the slowest) when both are a child's marks."""
    starts, ends = _times(marks, *begin), _times(marks, *end)
    if begin[0] == end[0] and begin[0].endswith("*"):
        spans = [ends[p] - starts[p] for p in starts if p in ends]
        return max(spans) if spans else None
    if not starts or not ends:
        return None
    return min(ends.values()) - min(starts.values())


def scan_phases(marks: list[Mark]) -> list[tuple[str, float]]:
    """Per scan (k-th of the session): the wait for its first counted frames (from ready, or the previous
    scan's file), its data, the file after its last data, and its verification."""
    at: dict[tuple[int, str], float] = {}
    for m in marks:
        match = _SCAN.match(m.name) if m.process == "session" else None
        if match:
            at.setdefault((int(match.group(1)), match.group(2)), m.wall)
    out, before = [], next((m.wall for m in marks if m.process == "session" and m.name == READY), None)
    for k in sorted({k for k, _ in at}):
        first, last = at.get((k, "first data")), at.get((k, "last data"))
        written, verified = at.get((k, "written")), at.get((k, "verified"))
        steps = (
            ("to first data", before, first),
            ("data", first, last),
            ("last data -> file", last, written),
            ("verify", written, verified),
        )
        out += [(f"scan {k}: {what}", b - a) for what, a, b in steps if a is not None and b is not None]
        before = written or before
    return out


def phases(timeline: Timeline) -> list[tuple[str, float]]:
    """Every phase this timeline has both marks of, in session order: (name, seconds)."""
    marks = timeline.sorted()
    out = []
    for name, begin, end in STARTUP_PHASES:
        seconds = _phase(marks, begin, end)
        if seconds is not None:
            out.append((name, seconds))
    out += scan_phases(marks)
    for name, begin, end in END_PHASES:
        seconds = _phase(marks, begin, end)
        if seconds is not None:
            out.append((name, seconds))
    return out


def marks_table(timeline: Timeline) -> Table:
    """Every mark: seconds since the start, since the previous mark, the process, the mark."""
    table = Table(title="session timeline (s since the stemstream process started)")
    for column in ("t (s)", "+ (s)", "process", "mark", "detail"):
        table.add_column(column, justify="right" if column.endswith("(s)") else "left")
    previous = None
    for m in timeline.sorted():
        step = "" if previous is None else f"{m.wall - previous:.2f}"
        table.add_row(f"{timeline.since(m):.2f}", step, m.process, m.name, m.detail)
        previous = m.wall
    return table


def phases_table(rows: list[tuple[str, float]], title: str = "where the session's seconds go") -> Table:
    """Phases and their seconds."""
    table = Table(title=title)
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.2f}")
    return table
