"""Acquiring scans: the simulated camera playing its scans (the demo, scheduled experiments, tests), and
waiting for each counted file as the scan writer leaves it, whoever triggered the scan (an instrument
session triggers nothing: it counts whatever the receivers deliver)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from counting.errors import TransientError
from counting.geometry import ScanShape
from counting.settings import SimulatorSettings
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.camera.receivers import send_simulated_scan
from streaming.camera.script import load_script
from streaming.protocol.record import ScanRecord
from tasks.acquisition.result import CameraCounts


class ScanTimeout(TransientError, TimeoutError):
    """A scan's file did not appear in time."""


@dataclass(frozen=True)
class ScanRequest:
    """One scan the simulated camera plays: its number, its simulated data, and the pause before it."""

    scan_number: int
    config: SimulatorConfig
    pause: float = 0.0  # seconds before this scan starts (a microscopist aligning, a tilt)


def simulated_scans(
    n_scans: int, width: int, height: int, dose: float, simulator: SimulatorSettings, first_scan: int
) -> list[ScanRequest]:
    """n scans of one shape, numbered on from first_scan, each its own sample on the same detector."""
    base = SimulatorConfig(
        ScanShape(width, height),
        frames_per_position=simulator.frames_per_position,
        dose=dose,
        seed=simulator.seed,
        flyback=simulator.flyback,
    )
    return [ScanRequest(n, base.for_scan(n)) for n in range(first_scan, first_scan + n_scans)]


def scripted_scans(path: Path, simulator: SimulatorSettings) -> list[ScanRequest]:
    """The scans of a microscopist's script (streaming.camera.script: shapes, numbers, pauses, seeds)."""
    script = load_script(path, simulator)
    return [ScanRequest(s.scan_number, script.config(s), s.pause_before) for s in script.scans]


def trigger_simulated_scan(
    receivers: list[str], scan: ScanRequest, rate: float | None = None, timeout: float = 600.0
) -> CameraCounts:
    """Play one simulated scan into the aggregator, as the four receiving servers would; returns counts.

    rate None: the camera waits for the pipeline (a file replay; nothing is lost). A rate in frames/s: the
    camera runs in real time, as the instrument does, and the receivers drop (and count) every sector the
    aggregator cannot take at once.
    """
    results = send_simulated_scan(
        SimulatedCamera(scan.config),
        receivers,
        rate,
        scan_number=scan.scan_number,
        realtime=rate is not None,
        send_timeout=timeout,
    )
    return CameraCounts(
        sectors_sent=sum(r.sent for r in results),
        sectors_dropped=sum(r.dropped for r in results),
        sectors_overflowed=sum(r.overflowed for r in results),
    )


class CameraRun:
    """The simulated camera playing its scans one after another in a background thread (pauses included),
    independent of the session that counts them, as a microscope is."""

    def __init__(
        self, scans: Sequence[ScanRequest], receivers: list[str], rate: float | None, timeout: float
    ) -> None:
        self.scans = list(scans)
        self._receivers, self._rate, self._timeout = receivers, rate, timeout
        self.counts: dict[int, CameraCounts] = {}  # by index in scans
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._play, name="simulated-camera", daemon=True)

    def start(self) -> CameraRun:
        """Start playing."""
        self._thread.start()
        return self

    def _play(self) -> None:
        try:
            for i, scan in enumerate(self.scans):
                if self._stop.wait(scan.pause):
                    return
                self.counts[i] = trigger_simulated_scan(self._receivers, scan, self._rate, self._timeout)
        except BaseException as exc:  # surfaced by check(), in the session's thread
            self.error = exc

    def check(self) -> None:
        """Raise the camera's own failure, if it had one."""
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the scan being played (pauses end at once)."""
        self._stop.set()
        self._thread.join(timeout)


def wait_for_new_scan(
    output_dir: Path,
    seen: set[str],
    match: Callable[[ScanRecord], bool],
    deadline: float | None,
    check: Callable[[], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> ScanRecord | None:
    """The first stop record not in ``seen`` that ``match``es, once the writer has left it (its HDF5 is on
    disk); it is added to ``seen``. None when the monotonic ``deadline`` passes (None: no deadline) or
    ``stop()`` says so. ``check()`` runs between looks (raise to abort)."""
    while deadline is None or time.monotonic() < deadline:
        for path in sorted(output_dir.glob("*.json")) if output_dir.exists() else []:
            if str(path) in seen:
                continue
            try:
                record = ScanRecord.load(path)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a stop record
            if match(record):
                seen.add(str(path))
                return record
        if check is not None:
            check()
        if stop is not None and stop():
            return None
        time.sleep(0.05)
    return None
