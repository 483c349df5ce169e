"""The session finds its live page's URL in the view's log and links each scan's summary row to it."""

from __future__ import annotations

from pathlib import Path

from tasks.acquisition.live import live_link, live_url


def test_live_url_from_the_view_log(tmp_path: Path):
    assert live_url(tmp_path) is None  # no view (yet)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "view.log").write_text(
        "warning: port taken\nlive: http://127.0.0.1:41234/\nsnapshots: x\n"
    )
    assert live_url(tmp_path) == "http://127.0.0.1:41234/"


def test_live_link_names_the_scan_file():
    row = live_link("http://host:17080/?token=abc", "/data/scans/FOURD_261205_2302_00001_00001.h5")
    assert row == {"live view": "http://host:17080/#file=FOURD_261205_2302_00001_00001.h5"}  # no token
    assert live_link(None, "/x.h5") == {"live view": ""}
