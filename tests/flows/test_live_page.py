"""The live page in headless Chromium while two real node streamers count scans: the images change while
frames arrive, the scan list follows the session, and the final image the page serves equals the sums from
the written file; the live phase panels (tilt-corrected BF, iDPC) and the fitted defocus appear, during
the scan and final. Prints the update latency the page measured (batch counted -> its image shown)."""

from __future__ import annotations

import json
import re
import statistics
import threading
from pathlib import Path

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.simulator import SimulatorConfig
from stemstream_testing.browser import headless_chromium
from stemstream_testing.live_oracle import live_sums_from_file
from stemstream_testing.pipeline import ProcessPipeline
from stemstream_testing.support import free_port
from streaming.settings import LiveSettings
from streaming.view.server import LiveServer

pytestmark = pytest.mark.timeout(400)
LIVE = {"bf_center": (288.0, 288.0), "bf_radius": 180.0, "interval": 0.25}


def page_read(browser) -> dict:
    """What the page shows of the current scan: its numbers and the versions of its images."""
    return browser.js(
        "return {frames: +document.getElementById('frames').textContent,"
        " key: document.body.dataset.key || '',"
        " bf: document.getElementById('img-bf').dataset.version || '',"
        " tcbf: document.getElementById('img-tcbf').dataset.version || '',"
        " idpc: document.getElementById('img-idpc').dataset.version || '',"
        " tcbfKey: document.getElementById('img-tcbf').dataset.key || '',"
        " shown: document.getElementById('img-tcbf').naturalWidth,"
        " defocus: document.getElementById('defocus').textContent,"
        " phaseNote: document.getElementById('phase-note').textContent,"
        " fits: document.getElementById('fits').textContent,"
        " rows: [...document.querySelectorAll('#scans tbody tr')].map(r => [r.dataset.key, r.dataset.status,"
        " r.lastChild.textContent])}"
    )


def served(browser, key: str, name: str) -> dict:
    """An image's values as the page's server gives them to the browser."""
    text = browser.js(
        "const x = new XMLHttpRequest(); x.open('GET', arguments[0], false); x.send(); return x.responseText;",
        f"api/scans/{key}/{name}.json",
    )
    return json.loads(text)


def test_live_page_shows_the_scan_build_up(tmp_path: Path):
    bind = f"tcp://127.0.0.1:{free_port()}"
    live = {**LIVE, "bind": bind}
    view = LiveServer(LiveSettings(**live, page_port=0), scan_dir=tmp_path / "out").start()
    try:
        with (
            ProcessPipeline(tmp_path, 2, streaming={"live": live}) as pipe,
            headless_chromium(tmp_path / "browser", width=1700, height=820) as browser,
        ):
            browser.open(view.url)
            browser.wait_for_text("connected")
            config = SimulatorConfig(ScanShape(48, 40), seed=2)
            sending = threading.Thread(target=pipe.send, args=(config, 1, 150.0))  # ~13 s: watched live
            sending.start()
            first = browser.wait_until(
                lambda: (r := page_read(browser))["frames"] > 0 and r["bf"] and r, "frames"
            )
            second = browser.wait_until(
                lambda: (
                    (r := page_read(browser))["bf"] != first["bf"] and r["frames"] > first["frames"] and r
                ),
                "the images to change",
            )
            assert second["frames"] < 1920, "the scan was over before the page was read twice"
            sending.join(120)
            record, h5 = pipe.record(1)
            done = browser.wait_until(
                lambda: (
                    (r := page_read(browser))["rows"]
                    and r["rows"][0][1] == "done"
                    and h5.name in r["rows"][0][2]
                    and r
                ),
                "scan 1 done with its file",
            )
            final = served(browser, done["key"], "bf")
            g = view.state.scan(done["key"]).geometry()
            want = live_sums_from_file(h5, g.cx, g.cy, g.bf_radius, g.adf_inner, g.adf_outer)
            np.testing.assert_array_equal(np.array(final["values"]), want["bf"])
            # That version or a later one: the final phase fit, which may come after the read above, bumps
            # the scan's version once more without changing the BF (ci35 waited for the older one).
            assert browser.wait_until(
                lambda: int(page_read(browser)["bf"] or -1) >= final["version"], "final image shown"
            )
            phase = browser.wait_until(
                lambda: (
                    (r := page_read(browser))["fits"].endswith("(final)")
                    and r["tcbf"]
                    and r["idpc"]
                    and r["shown"]
                    and r
                ),
                "the final phase fit and its images shown",
            )
            assert re.fullmatch(r"-?[0-9.e+-]+ ± [0-9.e+-]+ px/px", phase["defocus"]), phase
            assert "uncalibrated" in phase["phaseNote"]
            record = view.state.scan(done["key"]).phase
            assert record["final"] and record["status"] == "ok", record
            latencies = list(browser.js("return window.liveLatencies"))

            sending = threading.Thread(target=pipe.send, args=(config, 2, 150.0))
            sending.start()
            rows = browser.wait_until(
                lambda: len(r := page_read(browser)["rows"]) == 2 and r, "scan 2 listed"
            )
            assert rows[0][1] == "live" and rows[1][1] == "done"
            browser.wait_until(lambda: page_read(browser)["frames"] > 600, "scan 2 half way")
            live_phase = browser.wait_until(
                lambda: (r := page_read(browser))["tcbf"] and r["tcbfKey"] == rows[0][0] and r,
                "scan 2's phase images during the scan",
            )
            assert not live_phase["fits"].endswith("(final)") and live_phase["defocus"] != "–", live_phase
            browser.screenshot(tmp_path / "live-view.png")  # README's docs/live-view.png is one of these
            sending.join(120)
            pipe.record(2)
            assert not browser.console_errors()
            assert len(latencies) >= 3
            newest, oldest = (statistics.median(x) for x in zip(*latencies, strict=True))
            print(
                f"update latency, median of {len(latencies)}: newest batch {newest:.3f} s, oldest {oldest:.3f} s"
            )
    finally:
        view.stop()
