"""The live page's phase panels in headless Chromium while `stemstream replay SCAN.h5 --rate FPS` (a real
process) streams a simulated scan with a known defocus, astigmatism and rotation: at two moments during the
scan the tilt-corrected BF and iDPC panels show images (pixels read back from the page, not blank) whose
pixels changed between the two, and the defocus (with its uncertainty), the astigmatism and the rotation are
shown and changed; after the scan the page shows the final fit's numbers, as /api/state gives them, and the
final images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stemstream_testing.browser import Browser, headless_chromium
from stemstream_testing.phase_replay import TRUTH, ReplayProcess, write_phase_scan
from tests.conftest import set_env

pytestmark = pytest.mark.timeout(120)
SIDE = 40
RATE = 600  # frames/s: the 1600 frames take about 2.7 s, several phase fits apart
NUMBERS = ("defocus", "astigmatism", "astigmatism-angle", "rotation")
PANELS = ("tcbf", "idpc")

# What the page shows: its phase numbers as text, and each phase panel's pixels drawn onto a canvas (a
# digest of them: size, range, mean and a hash), read from the real DOM.
READ = """
const text = id => document.getElementById(id).textContent;
const pixels = id => {
  const img = document.getElementById("img-" + id);
  if (!img.complete || !img.naturalWidth) return null;
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let lo = 255, hi = 0, sum = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i];
    lo = Math.min(lo, v); hi = Math.max(hi, v); sum += v;
    hash = (Math.imul(hash, 31) + v) >>> 0;
  }
  return {width: c.width, height: c.height, lo: lo, hi: hi, mean: sum / (d.length / 4), hash: hash,
          key: img.dataset.key || ""};
};
return {status: text("status"), frames: +text("frames"), key: document.body.dataset.key || "",
        fits: text("fits"), note: text("phase-note"),
        defocus: text("defocus"), astigmatism: text("astigmatism"),
        "astigmatism-angle": text("astigmatism-angle"), rotation: text("rotation"),
        tcbf: pixels("tcbf"), idpc: pixels("idpc")};
"""

# The final record's numbers as the page should print them (its digits, by JavaScript's own toPrecision).
EXPECTED = """
const x = new XMLHttpRequest(); x.open("GET", "api/state", false); x.send();
const s = JSON.parse(x.responseText).scans.find(s => s.key === arguments[0]), ph = s.phase;
const p = (v, n) => (+v).toPrecision(n);
return {record: ph, status: s.status, defocus: p(ph.defocus, 4) + " ± " + p(ph.defocus_err, 2) + " px/px",
        astigmatism: p(ph.astigmatism, 3) + " ± " + p(ph.astigmatism_err, 2) + " px/px",
        "astigmatism-angle": p(ph.astigmatism_angle, 3), rotation: p(ph.rotation, 3)};
"""

# A served PNG's pixels, loaded afresh (the digest READ makes of a panel).
SERVED = """
const done = arguments[arguments.length - 1], img = new Image();
img.onload = () => {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let hash = 0;
  for (let i = 0; i < d.length; i += 4) hash = (Math.imul(hash, 31) + d[i]) >>> 0;
  done(hash);
};
img.onerror = () => done(null);
img.src = "api/scans/" + encodeURIComponent(arguments[0]) + "/" + arguments[1] + ".png?fresh=" + Date.now();
"""


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x40 counted scan at 200 e/frame with the known aberrations (the simulator's fast path), written."""
    return write_phase_scan(tmp_path_factory.mktemp("phase_page") / "scan_00005.h5", SIDE, scan_number=5)


def read(browser: Browser) -> dict:
    """The page's phase numbers and panels now."""
    return browser.js(READ)


def drawn(shown: dict, key: str) -> bool:
    """Both phase panels show an image of this scan that is not blank (pixels of more than one value)."""
    return all(
        (p := shown[name])
        and p["key"] == key
        and (p["width"], p["height"]) == (SIDE, SIDE)
        and p["hi"] > p["lo"]
        for name in PANELS
    )


def fitted(shown: dict) -> bool:
    """The numbers of a fit are shown: the defocus with its uncertainty, the astigmatism, the rotation."""
    number = r"-?[0-9.]+(e[+-][0-9]+)?"
    return bool(
        re.fullmatch(rf"{number} ± {number} px/px", shown["defocus"])
        and re.fullmatch(rf"{number} ± {number} px/px", shown["astigmatism"])
        and re.fullmatch(number, shown["astigmatism-angle"])
        and re.fullmatch(number, shown["rotation"])
    )


def test_phase_panels_and_numbers_update_during_a_replay(
    stemstream_env: Path, scan_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    set_env(monkeypatch, "streaming__live", phase_interval=0.2, interval=0.1, bf_radius=180.0)
    monkeypatch.setenv("STEMSTREAM_STREAMING__LIVE__BF_CENTER", "[288.0, 288.0]")
    with (
        ReplayProcess(scan_file, RATE) as replay,
        headless_chromium(tmp_path / "browser", width=1400, height=800, timeout=30) as browser,
    ):
        browser.open(replay.url(60))
        browser.wait_for_text("connected")
        first = browser.wait_until(
            lambda: (s := read(browser))["status"] == "live" and fitted(s) and drawn(s, s["key"]) and s,
            "a phase fit and both phase panels drawn during the scan",
        )
        key = first["key"]
        assert key.startswith("replay-5-") and not first["fits"].endswith("(final)"), first
        assert first["frames"] < SIDE * SIDE and "uncalibrated" in first["note"], first

        def changed() -> dict | None:
            s = read(browser)
            assert s["status"] == "live", f"the scan ended before the page changed: {first} then {s}"
            moved = all(s[n] != first[n] for n in NUMBERS) and all(
                s[p]["hash"] != first[p]["hash"] for p in PANELS
            )
            return s if moved and fitted(s) and drawn(s, key) else None

        second = browser.wait_until(changed, "every phase number and both panels to change")
        assert int(second["fits"]) > int(first["fits"]) and second["frames"] > first["frames"]

        replay.wait("replayed: ", 60)
        final = browser.wait_until(
            lambda: (s := read(browser))["fits"].endswith("(final)") and drawn(s, key) and s,
            "the final phase fit shown",
        )
        want = browser.js(EXPECTED, key)
        assert want["status"] == "done" and want["record"]["final"] and want["record"]["status"] == "ok"
        for name in NUMBERS:
            assert final[name] == want[name], (name, final, want)
        assert abs(want["record"]["defocus"] / TRUTH["defocus"] - 1) < 0.10, want["record"]
        for name in PANELS:  # the panel shows the final image the view serves
            browser.wait_until(
                lambda n=name: (
                    read(browser)[n]["hash"] == browser.driver.execute_async_script(SERVED, key, n)
                ),
                f"the final {name} image shown",
            )
        assert not browser.console_errors()
        print(
            f"phase fits shown: {first['fits']} at {first['frames']} frames, {second['fits']} at "
            f"{second['frames']}, then {final['fits']}; final defocus {final['defocus']}"
        )
    assert replay.returncode == 0 and not replay.stderr, replay.stderr
