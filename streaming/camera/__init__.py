"""The emulated 4D Camera receivers (the sim side): senders, sources, pacing, faults and scan scripts.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "SenderFaults": "streaming.camera.faults",
    "DEFAULT_HWM": "streaming.camera.push",
    "SenderError": "streaming.camera.push",
    "send_scan": "streaming.camera.receivers",
    "send_simulated_scan": "streaming.camera.receivers",
    "SharedRendering": "streaming.camera.rendering",
    "ScanScript": "streaming.camera.script",
    "ScriptError": "streaming.camera.script",
    "ScriptedSend": "streaming.camera.script",
    "load_script": "streaming.camera.script",
    "play_script": "streaming.camera.script",
    "SendResult": "streaming.camera.sender",
    "run_sender": "streaming.camera.sender",
}
__all__ = [
    "DEFAULT_HWM",
    "load_script",
    "play_script",
    "run_sender",
    "ScanScript",
    "ScriptedSend",
    "ScriptError",
    "send_scan",
    "send_simulated_scan",
    "SenderError",
    "SenderFaults",
    "SendResult",
    "SharedRendering",
]

if TYPE_CHECKING:
    from streaming.camera.faults import SenderFaults
    from streaming.camera.push import DEFAULT_HWM, SenderError
    from streaming.camera.receivers import send_scan, send_simulated_scan
    from streaming.camera.rendering import SharedRendering
    from streaming.camera.script import ScanScript, ScriptedSend, ScriptError, load_script, play_script
    from streaming.camera.sender import SendResult, run_sender


__getattr__ = lazy_exports(__name__, _WHERE)
