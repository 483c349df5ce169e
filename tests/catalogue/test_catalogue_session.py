"""The session flow records every scan in the catalogue as it is verified, on a real PostgreSQL server
that is stopped mid-session and started again: nothing is lost, and a second session's reused scan
number is a scan of its own."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from catalogue import Catalogue, ScanQuery
from catalogue.recorder import PENDING_NAME
from counting.sparse import read_counted_scan
from flows.session import session
from stemstream_testing.postgres import PostgresServer
from streaming.protocol.record import ScanRecord, record_path

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.timeout(400)]


def _scans_in(url: str) -> int:
    try:
        with Catalogue.open(url, connect_timeout=2) as cat:
            return len(cat.search())
    except Exception:  # noqa: BLE001 - not there yet
        return 0


class Outage(threading.Thread):
    """Stops PostgreSQL once the first scan is in the catalogue, and starts it again only when the third
    scan's stop record is written, i.e. after the session handed the second scan over (the flow verifies
    and records a scan before it waits for the next)."""

    def __init__(self, server: PostgresServer, url: str, output_dir: Path) -> None:
        super().__init__(daemon=True)
        self.server, self.url, self.output_dir = server, url, output_dir
        self.stopped_at_records = -1
        self.error: BaseException | None = None

    def _records(self) -> int:
        return len([p for p in self.output_dir.glob("sessions/*/scans/FOURD_*.json")])

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 240
            while _scans_in(self.url) < 1:
                assert time.monotonic() < deadline, "scan 1 never reached the catalogue"
                time.sleep(0.2)
            self.server.stop()
            self.stopped_at_records = self._records()
            while self._records() < 3:
                assert time.monotonic() < deadline, "the third scan was never written"
                time.sleep(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            if not self.server.running:
                self.server.restart()


def test_sessions_record_every_scan_with_the_database_down_mid_session(
    stemstream_env: Path,  # noqa: F811
    postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url = postgres.create_database("sessions")
    monkeypatch.setenv("STEMSTREAM_CATALOGUE__URL", url)
    monkeypatch.setenv("STEMSTREAM_CATALOGUE__FLUSH_TIMEOUT", "60")
    monkeypatch.setenv("STEMSTREAM_SESSION__NODES", "1")
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            {
                "scans": [
                    {"width": 8, "height": 8, "scan_number": 1},
                    {"width": 8, "height": 8, "scan_number": 1, "pause": 3.0},  # the number again
                    {"width": 12, "height": 8, "scan_number": 2, "pause": 1.0},
                ]
            }
        )
    )
    outage = Outage(postgres, url, stemstream_env)
    outage.start()
    first = session(script=str(script), nodes=1, postprocess=False, return_state=True)
    outage.join(60)
    assert outage.error is None, outage.error
    assert outage.stopped_at_records < 3  # stopped before the session had written its second or third scan
    assert first.is_completed(), first.message
    run_a = str(first.state_details.flow_run_id)

    second = session(n_scans=1, scan_width=8, scan_height=8, nodes=1, postprocess=True, return_state=True)
    assert second.is_completed(), second.message
    run_b = str(second.state_details.flow_run_id)

    with Catalogue.open(url) as cat:
        a = cat.search(ScanQuery(session=run_a))
        b = cat.search(ScanQuery(session=run_b))
        ones = cat.search(ScanQuery(scan_number=1))
    assert sorted((s.scan_number, s.shape) for s in a) == [(1, "8x8"), (1, "8x8"), (2, "12x8")]
    assert [(s.scan_number, s.shape) for s in b] == [(1, "8x8")]
    assert len(ones) == 3 and len({s.uid for s in ones}) == 3  # one number, three scans
    for scan in a + b:
        assert scan.verified and scan.status == "complete" and scan.sha256 and Path(scan.path).is_file()
        assert scan.dark and scan.dark.endswith("dark.npy")
        # the writer's uuid: in the stop record and in the file, the catalogue's key
        assert read_counted_scan(Path(scan.path)).metadata["stemstream"]["scan_uuid"] == scan.uid
        assert ScanRecord.load(record_path(Path(scan.path))).scan_uuid == scan.uid
    assert [sorted(a.kind for a in s.analyses) for s in b] == [["session", "stream-phase"]]
    assert next(a for a in b[0].analyses if a.kind == "session").results["probe_radius_px"] > 0
    for scan in a + b:  # every verified scan's phase fit; an 8x8 scan's 7 sample columns are too few: why
        (phase,) = [x for x in scan.analyses if x.kind == "stream-phase"]
        if scan.shape == "8x8":
            assert phase.results["phase"]["status"] == "failed" and "8x8 used positions" in phase.error
    assert not list(stemstream_env.rglob(PENDING_NAME))  # everything was recorded once the server was back
    said = _log_lines(first.state_details.flow_run_id)
    assert any("is unreachable" in line and "kept, recorded when it is back" in line for line in said), said
    assert any("catalogue reachable again" in line for line in said), said


def _log_lines(flow_run_id) -> list[str]:
    """The flow run's log lines, as the Prefect API holds them (the UI shows these)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_a_session_records_in_sqlite_in_the_output_directory_by_default(stemstream_env: Path) -> None:  # noqa: F811
    state = session(n_scans=1, scan_width=8, scan_height=8, nodes=1, postprocess=False, return_state=True)
    assert state.is_completed(), state.message
    run = str(state.state_details.flow_run_id)
    with Catalogue.open(f"sqlite:///{stemstream_env / 'catalogue.sqlite'}", create=False) as cat:
        (scan,) = cat.search(ScanQuery(session=run))
    assert (scan.scan_number, scan.shape, scan.verified, scan.status) == (1, "8x8", True, "complete")
    assert scan.session_number is not None and Path(scan.path).parent.parent.name == run
