"""Raw 4D Camera sector files (format v4 and v5): write them, index them, and read assembled frames.

A sector file is a flat sequence of blocks: a 16-byte little-endian header
``uint32 scan_number, uint32 frame_number, uint16 scan_width, uint16 scan_height, uint16 x, uint16 y``
followed by one sector of uint16 pixels (v5: 144 rows x 576 cols, rows m*144..; v4: 576 rows x 144 cols,
columns m*144..). The sector (module) index is only in the file name (``module<m>``), as in stempy.

One format, in the modules of this package: ``layout`` (the block, the file names, the one error),
``writing`` (frames to module files), ``index`` (a header-only pass over the files, validated), ``scan``
(``RawScan``: assembled frames from the index) and ``block_io`` (vectored reads of sectors).
"""

from counting.raw.layout import (
    BLOCK_BYTES,
    DEFAULT_VERSION,
    HEADER_BYTES,
    SUPPORTED_VERSIONS,
    PathLike,
    RawFormatError,
    block_dtype,
    module_from_path,
    raw_file_name,
    sector_shape,
)
from counting.raw.scan import RawScan, open_raw_scan
from counting.raw.writing import write_raw_scan

__all__ = [
    "BLOCK_BYTES",
    "DEFAULT_VERSION",
    "HEADER_BYTES",
    "SUPPORTED_VERSIONS",
    "PathLike",
    "RawFormatError",
    "RawScan",
    "block_dtype",
    "module_from_path",
    "open_raw_scan",
    "raw_file_name",
    "sector_shape",
    "write_raw_scan",
]
