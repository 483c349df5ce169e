"""Where a session's seconds go: a timeline of named marks, on one wall-clock axis for every process.

The `stemstream` process that runs a session (the CLI, or the worker of a deployment's run) marks its own
steps in ``TIMELINE`` (in memory). Its child processes (node streamers, aggregator, live view) each write
their marks into their own log (<session>/logs/<name>.log) as one line per mark::

    ... INFO stemstream.timing: timing: {"mark": "imports", "wall": 1765091234.123}

(``timing: `` then a JSON object: the mark's name and its wall time, time.time()). A child's start is its
process's start from /proc (interpreter start-up and imports included). Marks a child reaches inside code
that only logs (a node joining, its counting kernels warmed, the aggregator bound) are taken from those log
records as they are emitted (``install_tap``: no line of the product's logs changes). At the session's end
the child lines are read back (``child_marks``) and the whole timeline is written as timeline.json into the
session's log directory (``write``), never over an existing file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TIMING_PREFIX = "timing: "
TIMING_LOGGER = "stemstream.timing"
TIMELINE_FILE = "timeline.json"

# Mark names (the phases in flows/timeline_phases.py refer to them).
PROCESS_START = "process start"
IMPORTS = "imports"
COMMAND = "command"
SETTINGS = "settings loaded"
PREFECT_STARTED = "prefect server process started"  # the CLI started it before importing Prefect
PREFECT_IMPORTED = "prefect imported"
PREFECT_UP = "prefect server up"
FLOW_BEGINS = "flow run begins"
FLOW_ENDS = "flow run ends"
EXIT = "exit"
CONFIGURED = "configured"  # a child: its settings, configuration and calibration loaded


@dataclass(frozen=True)
class Mark:
    """One moment of the session: what, in which process, when (wall clock, time.time())."""

    name: str
    process: str
    wall: float
    detail: str = ""


def process_start_wall(pid: int | str = "self") -> float | None:
    """When this (or another) process started, as wall-clock seconds, from /proc (10 ms resolution); None
    where /proc or CLOCK_BOOTTIME is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


@dataclass
class Timeline:
    """The marks of one session, in the order they happened; thread-safe (the flow's tasks run in threads)."""

    origin: float | None = None  # the axis' zero (wall clock): the process start, else the first mark
    marks: list[Mark] = field(default_factory=list)
    session_dir: Path | None = None  # set by the session run: where timeline.json goes
    held_by_cli: bool = False  # the CLI writes timeline.json at its exit (with its own last marks)
    written: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def mark(self, name: str, detail: str = "", wall: float | None = None, process: str = "session") -> Mark:
        """Record a mark now (or at ``wall``)."""
        m = Mark(name, process, time.time() if wall is None else wall, detail)
        with self._lock:
            self.marks.append(m)
            if self.origin is None:
                self.origin = m.wall
        return m

    def extend(self, marks: list[Mark]) -> None:
        """Add marks taken elsewhere (the children's)."""
        with self._lock:
            self.marks.extend(marks)

    def sorted(self) -> list[Mark]:
        """Every mark, in time order."""
        with self._lock:
            return sorted(self.marks, key=lambda m: m.wall)

    def since(self, mark: Mark) -> float:
        """Seconds from the origin to a mark."""
        return mark.wall - (self.origin if self.origin is not None else mark.wall)

    def to_json(self) -> dict:
        """The timeline as JSON: the origin and every mark with its seconds since the origin."""
        return {
            "origin_wall": self.origin,
            "marks": [asdict(m) | {"t": round(self.since(m), 3)} for m in self.sorted()],
        }

    def write(self, log_dir: Path | None = None) -> Path | None:
        """timeline.json into the log directory (the session's unless given), with the children's marks
        read from their logs first; a free name beside it if one is there already. None: no directory."""
        folder = log_dir or (self.session_dir / "logs" if self.session_dir is not None else None)
        if folder is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        known = {(m.process, m.name, m.wall) for m in self.marks}
        self.extend([m for m in child_marks(folder) if (m.process, m.name, m.wall) not in known])
        path, n = folder / TIMELINE_FILE, 1
        while path.exists():  # never overwrite: an earlier run's, or one the flow wrote
            path, n = folder / f"timeline-{n}.json", n + 1
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        self.written = path
        return path


def load_timeline(path: Path) -> Timeline:
    """A timeline written by ``Timeline.write``."""
    data = json.loads(path.read_text())
    marks = [Mark(m["name"], m["process"], float(m["wall"]), m.get("detail", "")) for m in data["marks"]]
    return Timeline(origin=data.get("origin_wall"), marks=marks)


# The process's own timeline. The CLI starts it at its process's start; a session run outside the CLI
# (a deployment's worker, a test) gets a fresh one per run (``session_timeline``).
TIMELINE = Timeline()


def cli_timeline() -> Timeline:
    """The CLI's timeline, its zero at this process's start (marked), held by the CLI (it writes the file)."""
    if not TIMELINE.marks:
        start = process_start_wall()
        if start is not None:
            TIMELINE.mark(PROCESS_START, wall=start, process="cli")
    TIMELINE.held_by_cli = True
    return TIMELINE


def session_timeline() -> Timeline:
    """The timeline a session run marks: the CLI's when the CLI runs it, else a fresh one."""
    return TIMELINE if TIMELINE.held_by_cli else Timeline()


# ---- child processes -------------------------------------------------------------------------------
def emit(name: str, wall: float | None = None, detail: str = "") -> None:
    """Write one ``timing:`` line (through logging: a child's log is its stderr)."""
    record = {"mark": name, "wall": round(time.time() if wall is None else wall, 6)}
    if detail:
        record["detail"] = detail
    logger = logging.getLogger(TIMING_LOGGER)
    if logger.level == logging.NOTSET:  # shown even where the process logs warnings only (the view)
        logger.setLevel(logging.INFO)
    logger.info("%s%s", TIMING_PREFIX, json.dumps(record))


# Log records that are marks: (logger name, start of the message's format string, mark). The format string,
# not the formatted text: it names what happened, whatever the values.
TAPPED = (
    ("streaming.node.workers.pool", "%d counting worker(s) started and warmed up", "kernels warmed"),
    ("streaming.node.hosted_writer", "%s: hosting the scan writer", "writer started"),
    ("streaming.node.uplink", "%s: welcomed as node", "joined"),
    ("streaming.aggregator.aggregator", "aggregator: receivers", "bound"),
)


class TimingTap(logging.Handler):
    """A logging handler that turns the first record of each kind in ``TAPPED`` into a ``timing:`` line
    at the record's own time."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        """A tapped record: its mark, once."""
        for logger, start, name in TAPPED:
            if record.name == logger and str(record.msg).startswith(start) and name not in self.seen:
                self.seen.add(name)
                emit(name, record.created)


def child_started(command: float | None = None, imports_done: bool = True) -> None:
    """A child's first marks (its process start, its command's start at wall time ``command``, its imports
    done) and the tap for the later ones."""
    start = process_start_wall()
    if start is not None:
        emit(PROCESS_START, start)
    if command is not None:
        emit(COMMAND, command)
    if imports_done:
        emit(IMPORTS)
    root = logging.getLogger()
    if not any(isinstance(h, TimingTap) for h in root.handlers):
        root.addHandler(TimingTap())


_LINE = re.compile(re.escape(TIMING_PREFIX) + r"(\{.*\})\s*$")


def child_marks(log_dir: Path) -> list[Mark]:
    """The ``timing:`` marks in a log directory's logs, each named after its log (node0, aggregator, ...)."""
    found = []
    for log in sorted(log_dir.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            match = _LINE.search(line)
            if match is None:
                continue
            try:
                data = json.loads(match.group(1))
                found.append(
                    Mark(str(data["mark"]), log.stem, float(data["wall"]), str(data.get("detail", "")))
                )
            except (ValueError, KeyError, TypeError):
                continue  # a torn line (a process killed mid-write): the other marks still count
    return found
