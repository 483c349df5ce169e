"""The session summary's markdown links to the live page (without its token) and to each scan on it."""

from __future__ import annotations

from flows.summary import live_markdown
from streaming.protocol.record import ScanRecord
from tasks.acquisition.result import ScanResult


def _result(number: int, path: str | None) -> ScanResult:
    record = ScanRecord(
        scan_number=number, status="complete", path=path, scan_width=8, scan_height=8, expected_frames=64,
        frames_written=64, complete_frames=64, completeness=1.0, events=640, nodes=1, nodes_done=1,
        reasons=["complete"], sectors_lost_in_transit=0, thresholds=[1.0],
    )  # fmt: skip
    return ScanResult(record, verified=True)


def test_the_summary_markdown_links_to_the_live_page_and_each_scan():
    results = [_result(1, "/data/scans/FOURD_261207_1100_00001_00001.h5"), _result(2, None)]
    text = live_markdown("http://aggregator.example:17080/?token=s3cret-value", results)
    assert text is not None
    assert "[http://aggregator.example:17080/](http://aggregator.example:17080/)" in text
    link = "http://aggregator.example:17080/#file=FOURD_261207_1100_00001_00001.h5"
    assert f"- scan 1: [FOURD_261207_1100_00001_00001.h5]({link})" in text
    assert "scan 2" not in text  # not written: nothing to link to
    assert "s3cret" not in text and "token" not in text  # artifacts never carry the page's token


def test_no_page_no_markdown():
    assert live_markdown(None, [_result(1, "/x.h5")]) is None
