"""The live page at the microscope (uvicorn): snapshots in, images and the session's scans out.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "LiveServer": "streaming.view.server",
}
__all__ = ["LiveServer"]

if TYPE_CHECKING:
    from streaming.view.server import LiveServer


__getattr__ = lazy_exports(__name__, _WHERE)
