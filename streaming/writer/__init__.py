"""The scan writer: counted events in, one stempy-format sparse HDF5 and its stop record out.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "ScanWriterError": "streaming.writer.files",
    "check_output_dir": "streaming.writer.files",
    "ThresholdBroker": "streaming.writer.thresholds",
    "ScanWriter": "streaming.writer.writer",
    "WriterConfig": "streaming.writer.writer",
}
__all__ = ["check_output_dir", "ScanWriter", "ScanWriterError", "ThresholdBroker", "WriterConfig"]

if TYPE_CHECKING:
    from streaming.writer.files import ScanWriterError, check_output_dir
    from streaming.writer.thresholds import ThresholdBroker
    from streaming.writer.writer import ScanWriter, WriterConfig


__getattr__ = lazy_exports(__name__, _WHERE)
