"""The microscope-metadata settings section; composed into the one Settings object in flows/settings.py.

Apart from tasks.microscope so that building settings never imports the readers (ncempy, h5py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

# Where the convergence semi-angle is looked for in a DM4's image tags, in order. Gatan's GMS has no
# standard tag for it: NCEM's 4D Camera acquisition script writes its own "4Dcamera Parameters" group
# (scan_number, nread, nskip, nflyback), and the semi-angle belongs there; the second is the form other
# sites use. A missing tag falls back on microscope.convergence_semiangle_mrad, then "uncalibrated".
CONVERGENCE_TAGS = [
    "4Dcamera Parameters.convergence_semiangle_mrad",
    "Microscope Info.Convergence Semi-angle (mrad)",
]


class MicroscopeSettings(BaseModel):
    """Where the microscope's own record of each scan (a DM4 with the HAADF image and its calibrations, or
    a JSON sidecar) is found, and how it is read."""

    dir: Path | None = Field(
        None,
        description="directory where the microscope saves its file per scan (NCEM: the Distiller sync "
        "directory); none: no microscope metadata is looked for",
    )
    pattern: str = Field(
        "scan{scan}.dm4",
        description="file name of a scan's microscope file, {scan} the scan number (format spec allowed, "
        "e.g. scan{scan:05d}.dm4); a glob pattern (* ?) is matched as such. .dm4/.dm3 are read with "
        "ncempy, .json as a sidecar",
    )
    window: float = Field(
        3600.0,
        gt=0,
        description="seconds: the file's modification time must be within this of the scan's data, so an "
        "old file of a reused scan number is never taken",
    )
    wait: float = Field(
        10.0,
        ge=0,
        description="seconds to wait for the file after the scan is written (the microscope saves it "
        "after its own scan ends)",
    )
    format: Literal["auto", "dm4", "json"] = Field("auto", description="auto: by the file's suffix")
    convergence_tags: list[str] = Field(
        default_factory=lambda: list(CONVERGENCE_TAGS),
        description="image-tag paths (dot-separated, under ImageTags) holding the convergence semi-angle "
        "in mrad, tried in order",
    )
    convergence_semiangle_mrad: float | None = Field(
        None,
        gt=0,
        description="the convergence semi-angle when the microscope's file has none (an aperture the "
        "session uses throughout); none: such scans are analysed uncalibrated in reciprocal space",
    )
    voltage_tag: str = Field("Microscope Info.Voltage", description="image-tag path of the voltage, V")
