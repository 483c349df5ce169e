"""A microscopist's session, scripted: simulated scans of given shapes, pauses between them, scan numbers
(the detector resets them, so one may come again), a seed and a dose per scan; played as the four
receiving servers would send them.

The script is JSON::

    {"scans": [{"width": 16, "height": 8, "scan_number": 1, "pause": 0.5, "seed": 3, "dose": 200}, ...]}

Every field of a scan is optional: width, height and dose default to the simulator settings'
(scan_width, scan_height, dose); scan_number to the scan's place in the script (1, 2, ...); pause (seconds
before the scan starts) to 0; seed to scan_seed(simulator seed, place in the script), so every scan,
a reused number too, is a different sample. All scans are taken with one camera: the settings'
frames_per_position and flyback, and the detector of the settings' seed (one dark reference serves them all).

A scan number that comes again is a new scan only when it starts more than the aggregator's
``scan_deadline`` after the first one ended; sooner, its sectors are late sectors of the first.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from counting.errors import PermanentError
from counting.geometry import ScanShape
from counting.settings import SimulatorSettings
from counting.simulator import SimulatedCamera, SimulatorConfig, scan_seed
from streaming.camera.push import DEFAULT_SEND_TIMEOUT
from streaming.camera.receivers import send_simulated_scan
from streaming.camera.sender import SendResult

_FIELDS = ("width", "height", "scan_number", "pause", "seed", "dose")
_MAX_DOSE = 20000.0  # SimulatorConfig's bound
_UINT16_MAX, _UINT32_MAX = 65535, 2**32 - 1  # the wire header's scan shape and scan number


class ScriptError(PermanentError, ValueError):
    """A scan script that cannot be read or holds a bad value."""


@dataclass(frozen=True)
class ScriptedScan:
    """One scan of a script: its shape, detector scan number, seconds to wait before it, seed and dose."""

    width: int
    height: int
    scan_number: int
    pause_before: float
    seed: int
    dose: float


@dataclass(frozen=True)
class ScanScript:
    """Scans to play in order with one camera (frames per position, flyback and detector are shared)."""

    scans: tuple[ScriptedScan, ...]
    frames_per_position: int
    flyback: bool
    detector_seed: int

    def config(self, scan: ScriptedScan) -> SimulatorConfig:
        """The simulated camera of one scan of this script."""
        return SimulatorConfig(
            ScanShape(scan.width, scan.height),
            frames_per_position=self.frames_per_position,
            dose=scan.dose,
            seed=scan.seed,
            flyback=self.flyback,
            detector_seed=self.detector_seed,
        )


@dataclass(frozen=True)
class ScriptedSend:
    """What playing one scan of a script did: the scan and each module sender's result (module order)."""

    scan: ScriptedScan
    results: tuple[SendResult, ...]

    @property
    def sent(self) -> int:
        """Sectors handed to the aggregator, all modules."""
        return sum(r.sent for r in self.results)

    @property
    def overflowed(self) -> int:
        """Real time only: sectors the aggregator did not take in time, all modules."""
        return sum(r.overflowed for r in self.results)


def load_script(path: str | os.PathLike[str], simulator: SimulatorSettings) -> ScanScript:
    """Read a JSON scan script; missing fields default from ``simulator`` (see the module docstring).

    Raises ScriptError with one line naming the file, the scan and the field for anything wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ScriptError(f"cannot read scan script {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ScriptError(f"scan script {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"scans"} or not isinstance(data["scans"], list):
        raise ScriptError(f'scan script {path}: expected {{"scans": [ ... ]}} and nothing else')
    if not data["scans"]:
        raise ScriptError(f"scan script {path} holds no scans")
    scans = tuple(
        _scan(entry, place, simulator, f"scan script {path}: scans[{place - 1}]")
        for place, entry in enumerate(data["scans"], start=1)
    )
    return ScanScript(scans, simulator.frames_per_position, simulator.flyback, simulator.seed)


def _scan(entry: object, place: int, sim: SimulatorSettings, where: str) -> ScriptedScan:
    if not isinstance(entry, dict):
        raise ScriptError(f"{where} must be an object with fields {', '.join(_FIELDS)}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ScriptError(f"{where} has unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    width = _int(entry, "width", sim.scan_width, 1, where, _UINT16_MAX)
    scan = ScriptedScan(
        width=width,
        height=_int(entry, "height", sim.scan_height, 1, where, _UINT16_MAX),
        scan_number=_int(entry, "scan_number", place, 0, where, _UINT32_MAX),
        pause_before=_number(entry, "pause", 0.0, 0.0, math.inf, where),
        seed=_int(entry, "seed", scan_seed(sim.seed, place), 0, where),
        dose=_number(entry, "dose", sim.dose, 0.0, _MAX_DOSE, where),
    )
    if sim.flyback and width < 2:
        raise ScriptError(
            f"{where}.width must be >= 2 with simulator.flyback (its last column is the flyback)"
        )
    return scan


def _int(entry: dict, name: str, default: int, low: int, where: str, high: int | None = None) -> int:
    value = entry.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ScriptError(f"{where}.{name} must be an integer {bound}, got {value!r}")
    return value


def _number(entry: dict, name: str, default: float, low: float, high: float, where: str) -> float:
    value = entry.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        bound = f">= {low:g}" if math.isinf(high) else f"in [{low:g}, {high:g}]"
        raise ScriptError(f"{where}.{name} must be a number {bound}, got {value!r}")
    if not math.isfinite(value):
        raise ScriptError(f"{where}.{name} must be finite, got {value!r}")
    return float(value)


def play_script(
    script: ScanScript,
    receivers: Sequence[str],
    rate: float | None = None,
    realtime: bool = False,
    send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
    on_sent: Callable[[ScriptedSend], None] | None = None,
) -> list[ScriptedSend]:
    """Play the script: for each scan, wait its pause, then send it as the four receivers do
    (scan_sender.send_simulated_scan: rate, realtime and send_timeout as there) under its scan number.
    ``on_sent`` is called after each scan (e.g. to print it); returns what each scan's send did."""
    if realtime and rate is None:
        raise ValueError("realtime needs a rate (frames/s): a camera in real time runs at its own pace")
    played: list[ScriptedSend] = []
    for scan in script.scans:
        if scan.pause_before > 0:
            time.sleep(scan.pause_before)
        camera = SimulatedCamera(script.config(scan))
        results = send_simulated_scan(
            camera,
            receivers,
            rate,
            scan_number=scan.scan_number,
            realtime=realtime,
            send_timeout=send_timeout,
        )
        done = ScriptedSend(scan, tuple(results))
        played.append(done)
        if on_sent is not None:
            on_sent(done)
    return played
