"""The stop record of a scan: one typed record from the scan writer through the tasks to the summary.

The writer saves it as ``<scan file>.json`` beside the HDF5; verification, the session flow, the CLI and
the soak load it with :meth:`ScanRecord.load` and read its fields, never display labels (those are made
once, at the edge: ``flows/summary.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from counting.storage.durable import fsync_directory


class ScanStatus(StrEnum):
    """How a scan ended."""

    COMPLETE = "complete"  # every sector of every frame arrived and was counted
    INCOMPLETE = "incomplete"  # written, with missing sectors marked in sector_masks
    FAILED = "failed"  # not written (storage failure) or not countable (no thresholds)


@dataclass
class ScanRecord:
    """What exists after a scan and how it ended."""

    scan_number: int
    status: ScanStatus
    path: str | None
    scan_width: int
    scan_height: int
    expected_frames: int
    frames_written: int
    complete_frames: int
    completeness: float
    events: int
    nodes: int
    nodes_done: int
    reasons: list[str]
    sectors_lost_in_transit: int
    thresholds: list[float]
    sha256: str | None = None
    error: str | None = None
    first_data_time: float = 0.0
    last_data_time: float = 0.0
    written_time: float = 0.0
    counting_seconds: float = 0.0
    scan_id: int = 0  # unique in the output directory (0: written before ids existed)
    scan_uuid: str = ""  # unique everywhere (uuid4 hex), also in the HDF5's /metadata/stemstream
    extra: dict = field(default_factory=dict)  # fields a newer writer added: kept, not lost

    @property
    def frames_incomplete(self) -> int:
        """Expected frames that are not complete (missing sectors, or missing altogether)."""
        return self.expected_frames - self.complete_frames

    @property
    def seconds_to_file(self) -> float:
        """From the last data of the scan reaching the writer to the file on disk."""
        return self.written_time - self.last_data_time

    @property
    def counted_frames_per_second(self) -> float:
        """Frames written per second, from the first data to the file on disk."""
        return self.frames_written / max(self.written_time - self.first_data_time, 1e-9)

    @property
    def events_per_frame(self) -> float:
        """Mean counted events per written frame."""
        return self.events / max(self.frames_written, 1)

    def hdf5_metadata(self) -> dict[str, int | float | str]:
        """The facts of this record that the scan's HDF5 also carries, as /metadata/stemstream attributes."""
        return {
            "scan_number": self.scan_number,
            "scan_id": self.scan_id,
            "scan_uuid": self.scan_uuid,
            "nodes": self.nodes,
            "nodes_done": self.nodes_done,
            "end_reasons": ",".join(self.reasons),
            "counting_seconds": self.counting_seconds,
        }

    def to_json(self) -> dict:
        """JSON-ready form (the status as its string)."""
        data = asdict(self)
        data["status"] = str(self.status)
        extra = data.pop("extra")
        return {**extra, **data}

    @classmethod
    def from_json(cls, data: dict) -> ScanRecord:
        """The record from its JSON form; unknown keys are kept in ``extra``."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known["status"] = ScanStatus(known["status"])
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def save(self, path: Path) -> None:
        """Write atomically (temporary name, then rename), so a reader never sees half a record; the record
        and its directory entry are fsynced, so it survives a crash or power loss once this returns."""
        tmp = path.with_name(f".{path.name}.partial")
        try:
            with open(tmp, "w") as fh:
                fh.write(json.dumps(self.to_json(), indent=2, default=float))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_directory(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):  # keep the original error, not one about the cleanup
                tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> ScanRecord:
        """Read a saved record."""
        return cls.from_json(json.loads(Path(path).read_text()))


def record_path(h5_path: Path) -> Path:
    """The stop record beside a scan file."""
    return h5_path.with_suffix(".json")
