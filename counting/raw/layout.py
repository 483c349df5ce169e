"""The raw block layout: header fields, sector shapes per version, file names, and the format's one error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from counting.errors import PermanentError
from counting.geometry import FRAME_COLS, FRAME_ROWS, N_SECTORS, SECTOR_BYTES, SECTOR_ROWS

PathLike = str | os.PathLike[str]

HEADER_BYTES = 16
# 165,904 bytes, identical for v4 and v5: the version cannot be sniffed from a file.
BLOCK_BYTES = HEADER_BYTES + SECTOR_BYTES
SUPPORTED_VERSIONS = (4, 5)
DEFAULT_VERSION = 5

# The header as stempy reads it (uint32[2] then uint16[4], host order = little-endian in practice).
HEADER_FIELDS = [
    ("scan_number", "<u4"),
    ("frame_number", "<u4"),
    ("scan_width", "<u2"),
    ("scan_height", "<u2"),
    ("x", "<u2"),
    ("y", "<u2"),
]
# Header fields only, but strided by a whole block, so a mapped file can be indexed without touching pixels.
HEADER_VIEW_DTYPE = np.dtype(
    {
        "names": [name for name, _ in HEADER_FIELDS],
        "formats": [fmt for _, fmt in HEADER_FIELDS],
        "offsets": [0, 4, 8, 10, 12, 14],
        "itemsize": BLOCK_BYTES,
    }
)
_MODULE_RE = re.compile(r"module(\d+)")


class RawFormatError(PermanentError, ValueError):
    """A raw sector file (or set of files) is malformed; the message names the file and byte offset."""


def raw_file_name(scan_number: int, module: int, file_index: int = 0) -> str:
    """Return the production file name of one module file of a scan."""
    return f"data_scan{scan_number:010d}_module{module}_dst0_file{file_index}.data"


def sector_shape(version: int) -> tuple[int, int]:
    """Return the on-disk (rows, cols) of one sector for a file format version."""
    check_version(version)
    return (SECTOR_ROWS, FRAME_COLS) if version == 5 else (FRAME_ROWS, SECTOR_ROWS)


def block_dtype(version: int) -> np.dtype:
    """Return the numpy structured dtype of one header+sector block for a file format version."""
    return np.dtype([*HEADER_FIELDS, ("data", "<u2", sector_shape(version))])


def module_from_path(path: PathLike) -> int:
    """Return the sector (module) index encoded as ``module<m>`` in a file name."""
    name = Path(path).name
    match = _MODULE_RE.search(name)
    if match is None:
        raise RawFormatError(f"{path}: file name has no 'module<N>' part, so its sector is unknown")
    module = int(match.group(1))
    if not 0 <= module < N_SECTORS:
        raise RawFormatError(f"{path}: module {module} in file name is not in 0..{N_SECTORS - 1}")
    return module


def check_version(version: int) -> None:
    """ValueError unless `version` is a supported raw format version."""
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"raw format version must be one of {SUPPORTED_VERSIONS}, got {version!r}")


def sector_slice(version: int, module: int) -> tuple[slice, slice]:
    """Where sector `module` sits in a 576x576 frame: a row strip (v5) or a column strip (v4)."""
    strip = slice(module * SECTOR_ROWS, (module + 1) * SECTOR_ROWS)
    return (strip, slice(None)) if version == 5 else (slice(None), strip)
