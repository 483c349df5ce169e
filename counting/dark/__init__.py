"""Dark references: the mean dark frame from frames or a file (reference), its streamed per-pixel sums
(stats), the session's store of darks (store) and their settings (settings).

Its public names resolve on first use (PEP 562): importing the settings loads no runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "dark_reference": "counting.dark.reference",
    "load_dark": "counting.dark.reference",
    "load_frame_array": "counting.dark.reference",
}
__all__ = ["dark_reference", "load_dark", "load_frame_array"]

if TYPE_CHECKING:
    from counting.dark.reference import dark_reference, load_dark, load_frame_array


__getattr__ = lazy_exports(__name__, _WHERE)
