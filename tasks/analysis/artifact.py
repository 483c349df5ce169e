"""Analysis images for Prefect artifacts: embedded in the markdown, so they render with nothing else running,
but small in Prefect's database: the same pixels on a palette of at most 128 colours (about a third of the
bytes of the plots' RGBA PNGs); the full images stay on disk next to the scan's analysis."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def artifact_png(path: Path, colours: int = 128) -> bytes:
    """The PNG at path, quantised to a palette of ``colours``, as PNG bytes (same size in pixels)."""
    with Image.open(path) as img:
        out = io.BytesIO()
        img.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
        return out.getvalue()
