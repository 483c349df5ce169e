"""The session summary at the edge: display labels for typed scan results, made in this one place."""

from __future__ import annotations

from pathlib import Path

from tasks.acquisition.live import live_link, without_token
from tasks.acquisition.result import ScanResult

# label -> how it is computed from a ScanResult
COLUMNS = {
    "scan": lambda r: r.scan_number,
    "file": lambda r: Path(r.record.path).name if r.record.path else "",
    "status": lambda r: str(r.record.status),
    # None: not verified, a scan the session's end stopped mid-scan (its counted part kept, incomplete)
    "verified": lambda r: (
        "passed" if r.verified else ("stopped mid-scan" if r.verified is None else "FAILED")
    ),
    "frames": lambda r: r.record.frames_written,
    "events per frame": lambda r: round(r.record.events_per_frame, 1),
    "completeness %": lambda r: round(100 * r.record.completeness, 3),
    "frames incomplete": lambda r: r.record.frames_incomplete,
    "sectors dropped by receivers": lambda r: r.sectors_overflowed,
    "end reason": lambda r: ",".join(r.record.reasons),
    "sectors lost in transit": lambda r: r.record.sectors_lost_in_transit,
    "counted frames/s": lambda r: round(r.record.counted_frames_per_second),
    "seconds to counted file": lambda r: round(r.record.seconds_to_file, 3),
    "sha256": lambda r: (r.verify_sha256 or r.record.sha256 or "")[:16],
}
# What the terminal shows of each scan; the loss columns are added when any scan lost something.
TERMINAL = ["scan", "verified", "frames", "events per frame", "completeness %", "seconds to counted file"]
LOSSES = ["frames incomplete", "sectors dropped by receivers"]


def summary_row(result: ScanResult) -> dict:
    """One row of the session's summary table."""
    return {label: value(result) for label, value in COLUMNS.items()}


def terminal_columns(results: list[ScanResult]) -> list[str]:
    """The columns to print: the losses never go unshown."""
    lossy = any(r.record.frames_incomplete or r.sectors_overflowed for r in results)
    shown = TERMINAL[:4] + LOSSES + TERMINAL[4:] if lossy else list(TERMINAL)
    return shown + ["end reason"] if any(r.verified is None for r in results) else shown


def live_markdown(url: str | None, results: list[ScanResult]) -> str | None:
    """The summary's markdown: a link to the session's live page (without its token) and to each scan on
    it; None without a page."""
    if not url:
        return None
    page = without_token(url.split("#")[0])
    lines = ["## Live view", "", f"The session's live page: [{page}]({page})", ""]
    for r in results:
        if r.record.path:
            link = live_link(page, r.record.path)["live view"]
            lines.append(f"- scan {r.scan_number}: [{Path(r.record.path).name}]({link})")
    return "\n".join(lines) + "\n"
