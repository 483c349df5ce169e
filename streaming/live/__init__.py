"""The node side of the live view: snapshots of each scan's images sent to the view.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "LiveNode": "streaming.live.hooks",
    "LivePublisher": "streaming.live.publisher",
    "LiveTap": "streaming.live.tap",
}
__all__ = ["LiveNode", "LivePublisher", "LiveTap"]

if TYPE_CHECKING:
    from streaming.live.hooks import LiveNode
    from streaming.live.publisher import LivePublisher
    from streaming.live.tap import LiveTap


__getattr__ = lazy_exports(__name__, _WHERE)
