"""The session finds its live page's URL in the view's log and links each scan's summary row to it."""

from __future__ import annotations

from pathlib import Path

from streaming.view.token import TOKEN_FILE, write_token
from tasks.acquisition.live import live_link, live_url
from tasks.launch.state import SessionState


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


def test_live_url_of_a_remote_page_from_the_session_state(tmp_path: Path):
    """The NERSC backend's page runs on the aggregator host: its address is in the state, its token (for
    the user's terminal only) in the session's own token file."""
    SessionState(tmp_path, live_url="http://aggregator.example:17080/").save()
    assert live_url(tmp_path) == "http://aggregator.example:17080/"
    write_token(tmp_path / TOKEN_FILE, "a b")
    assert live_url(tmp_path) == "http://aggregator.example:17080/"  # links and logs: never the token
    assert live_url(tmp_path, with_token=True) == "http://aggregator.example:17080/?token=a%20b"
