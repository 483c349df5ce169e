"""The README's picture of the live page during a scan, phase panels visible: a simulated scan with a known
defocus, astigmatism and rotation (seeded), written as a counted file and replayed by `stemstream replay
--rate` (a real process, the live view's own code), the page in headless Chromium (Debian's chromium and
chromedriver), captured once a live fit has drawn the tilt-corrected BF and iDPC panels and about
--at of the frames are in.

Usage: python benchmarks/live_phase_screenshot.py [--side 96] [--defocus 0.1] [--rate 1500] [--at 0.5]
                                                   [--seed 3] [--out docs/images/live-phase-page.png]

The scan is the same for the same arguments; the moment captured (frames in, fits so far) depends on the
machine's speed, and is printed. An existing --out is never replaced: remove it first (git keeps the old).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stemstream_testing.browser import headless_chromium  # noqa: E402
from stemstream_testing.phase_replay import ReplayProcess, write_phase_scan  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "live-phase-page.png"
READ = """
const ok = id => { const i = document.getElementById("img-" + id); return i.complete && i.naturalWidth > 0; };
return {status: document.getElementById("status").textContent, frames: +document.getElementById("frames")
        .textContent, defocus: document.getElementById("defocus").textContent,
        fits: document.getElementById("fits").textContent, panels: ok("tcbf") && ok("idpc") && ok("bf")};
"""


def environment(work: Path) -> dict[str, str]:
    """The replay's settings: an empty settings file, the simulator's BF disk, frequent fits."""
    config = work / "stemstream.toml"
    config.write_text("# live_phase_screenshot.py: defaults and these variables only\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMSTREAM_")}
    env.update(
        STEMSTREAM_CONFIG=str(config),
        STEMSTREAM_OUTPUT_DIR=str(work),
        STEMSTREAM_STREAMING__LIVE__BF_CENTER="[288.0, 288.0]",
        STEMSTREAM_STREAMING__LIVE__BF_RADIUS="180.0",
        STEMSTREAM_STREAMING__LIVE__INTERVAL="0.1",
        STEMSTREAM_STREAMING__LIVE__PHASE_INTERVAL="0.5",
    )
    return env


def capture(args: argparse.Namespace, work: Path) -> dict:
    """Replay the scan into the page and take the screenshot; what the page showed then."""
    aberrations = {"defocus": args.defocus, "astigmatism": 0.02, "astigmatism_angle": 30.0, "rotation": 20.0}
    path = write_phase_scan(work / "scan_00001.h5", args.side, seed=args.seed, **aberrations)
    want = int(args.at * args.side * args.side)
    with (
        headless_chromium(work / "browser", width=1400, height=900, timeout=120) as browser,
        ReplayProcess(path, args.rate, environment(work)) as replay,
    ):
        browser.open(replay.url(120))
        shown = browser.wait_until(
            lambda: (
                (s := browser.js(READ))["status"] == "live"
                and s["frames"] >= want
                and s["panels"]
                and "±" in s["defocus"]
                and s
            ),
            f"a live phase fit drawn with {want} frames in",
        )
        time.sleep(0.3)  # the last images' loads finish (the page loads at most one per image each 0.25 s)
        browser.screenshot(args.out)
    if replay.returncode != 0:
        raise SystemExit(f"replay failed ({replay.returncode}): {replay.stderr}")
    return shown


def main() -> None:
    """Parse the arguments, capture, print what was captured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--defocus", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=1500.0, help="replay frames/s")
    parser.add_argument("--at", type=float, default=0.5, help="share of the frames in when captured")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: remove it first (it is never replaced)")
    with tempfile.TemporaryDirectory(prefix="live_phase_screenshot_") as work:
        shown = capture(args, Path(work))
    print(
        f"{args.out}: {args.side}x{args.side} scan, seed {args.seed}, defocus {args.defocus} px/px; captured at "
        f"{shown['frames']} frames, {shown['fits']} fits, defocus shown {shown['defocus']}"
    )


if __name__ == "__main__":
    main()
