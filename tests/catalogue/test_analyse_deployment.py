"""The re-analysis deployment as operators run it: `prefect deploy` of the repo's prefect.yaml, a process
worker, a run of stemstream-analyse/analyse on a scan in the catalogue: recorded beside the first
analysis; an unknown scan fails the run with one clear message. Loopback only, every process stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalogue import Catalogue, ScanEntry
from stemstream_testing.catalogue_scans import write_scan


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_analyse_deployment_records_a_reanalysis(shared_prefect_stack) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack = shared_prefect_stack.get()  # shared with the Prefect UI's test (tests/conftest.py)
    out = stack.output_dir  # the worker's output_dir: the catalogue is out/catalogue.sqlite
    record = write_scan(out / "scans", 3, 1, 12, 12, dose=60.0)
    url = f"sqlite:///{out / 'catalogue.sqlite'}"
    with Catalogue.open(url) as cat:
        cat.record_scan(ScanEntry(record, session_key="run-1", verified=True))
        cat.record_analysis(
            record.scan_uuid, {"dpc_q_highpass": 0.03}, {"probe_radius_px": 2.0}, kind="session"
        )
    with temporary_settings(updates={PREFECT_API_URL: stack.api}):
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("stemstream-analyse/analyse")
        assert dep.enforce_parameter_schema and dep.work_pool_name == "stemstream-local"
        props = dep.parameter_openapi_schema["properties"]
        assert set(props) == {"scan", "params", "keep_flyback"}
        assert dep.parameter_openapi_schema["required"] == ["scan"]
        assert all(prop.get("description") for prop in props.values())
        params = {"scan": record.scan_uuid[:8], "params": {"dpc_q_highpass": 0.05, "parallax": False}}
        ok = run_deployment("stemstream-analyse/analyse", parameters=params, timeout=200, poll_interval=1)
        assert ok.state is not None and ok.state.is_completed(), f"{ok.state}\n{stack.log_tails()}"
        assert "analysis 2 of FOURD_" in (ok.state.message or "")
        bad = run_deployment(
            "stemstream-analyse/analyse", parameters={"scan": "nothing-like-it"}, timeout=120, poll_interval=1
        )
        assert bad.state is not None and bad.state.is_failed(), f"{bad.state}\n{stack.log_tails()}"
        assert "no scan 'nothing-like-it' in the catalogue" in (bad.state.message or "")
    with Catalogue.open(url) as cat:
        first, second = cat.find_scan(record.scan_uuid).analyses
    assert (first.kind, second.kind) == ("session", "reanalysis")
    assert second.params["changed"] == {"dpc_q_highpass": 0.05, "parallax": False}
    assert second.results["probe_radius_px"] > 0 and all(Path(p).is_file() for p in second.images.values())
