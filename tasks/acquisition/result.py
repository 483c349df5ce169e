"""What a session learned about one scan: the writer's stop record, what the camera sent, whether a node
was lost meanwhile, and the verdict of verification. Typed end to end; labels are made at the edge
(flows/summary.py)."""

from __future__ import annotations

from dataclasses import dataclass

from streaming.protocol.record import ScanRecord


@dataclass(frozen=True)
class CameraCounts:
    """What the (simulated) camera's receivers sent and dropped."""

    sectors_sent: int = 0
    sectors_dropped: int = 0  # by request (fault injection)
    sectors_overflowed: int = 0  # a real-time camera: the pipeline did not take them in time


@dataclass
class ScanResult:
    """One scan of a session."""

    record: ScanRecord
    camera: CameraCounts | None = None  # None: an instrument scan, or the camera's counts were lost
    node_failure: str | None = None  # a node streamer was lost while this scan ran
    verified: bool | None = None  # None until verification ran
    verify_sha256: str | None = None

    @property
    def scan_number(self) -> int:
        """The scan number."""
        return self.record.scan_number

    @property
    def sectors_overflowed(self) -> int:
        """Sectors the receivers dropped because the pipeline did not take them in time."""
        return self.camera.sectors_overflowed if self.camera is not None else 0

    @property
    def complete_and_verified(self) -> bool:
        """Every frame complete and the file verified."""
        return self.record.status == "complete" and bool(self.verified)


@dataclass(frozen=True)
class AnalysisOutcome:
    """What the session's analysis of one scan produced (the postprocess-scan step), as the catalogue
    records it beside the scan (tasks/acquisition/catalogue_link.py)."""

    scan: str  # the counted file's path
    params: dict  # the analysis parameters (AnalysisConfig as a dict)
    summary: dict  # its numbers, where fitted values such as defocus and rotation go
    images: dict[str, str]  # PNG paths by name
    timings: dict[str, float]
    warnings: list[str]
    calibration: dict  # "calibrated" or why not (tasks.analysis.calibration)
    fitted: dict  # defocus, rotations

    @property
    def calibrated(self) -> bool:
        """The numbers are in calibrated units."""
        return bool(self.calibration.get("calibrated"))
