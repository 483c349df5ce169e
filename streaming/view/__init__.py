"""The live page at the microscope (uvicorn): snapshots in, images and the session's scans out.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "LiveServer": "streaming.view.server",
}
__all__ = ["LiveServer"]

if TYPE_CHECKING:
    from streaming.view.server import LiveServer


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
