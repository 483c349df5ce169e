"""A terminal session's processes started ahead of its flow (flows/session_early.py, flows/cli_session.py):
real node, aggregator and live-view processes, stopped on every way out where the flow does not take them
over, and taken over (not started twice) where it does."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from counting.geometry import FRAME_SHAPE
from flows.cli_session import launched_ahead
from flows.session_early import EarlyLaunch, flow_settings, launch, take
from flows.session_identity import dark_cache_file, simulated_dark_frame
from flows.settings import Settings, load_settings
from flows.timeline import AHEAD_END, AHEAD_START, Timeline
from stemstream_testing.support import wait_until
from tasks.launch.processes import ProcessGroup, carrying
from tasks.launch.state import SessionState


class _Log:
    """A run logger that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, message: str, *args: object) -> None:
        self.lines.append(message % args if args else message)

    info = warning


def _params() -> dict:
    """A one-node local demo's flow parameters, as the CLI builds them."""
    return dict(
        camera="simulated", n_scans=1, duration=0.0, scan_width=8, scan_height=8, dose=10.0,
        backend="local", nodes=1, postprocess=False, min_completeness=1.0, frame_rate=0.0, script="",
    )  # fmt: skip


def _running(early: EarlyLaunch) -> list[int]:
    """Live processes of the launch (by the tokens the session's state file lists: what cleanup uses)."""
    saved = SessionState.load(early.session_dir)
    assert saved.process_tokens and set(saved.process_tokens) == set(early.state.process_tokens)
    return [pid for token in saved.process_tokens for pid in carrying(token)]


def _gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


@pytest.fixture
def settings(stemstream_env: Path) -> Settings:
    return load_settings()


def test_processes_started_ahead_are_stopped_when_the_flow_never_starts(settings: Settings) -> None:
    timeline, params = Timeline(), _params()
    with (
        pytest.raises(RuntimeError, match="never came up"),
        launched_ahead(timeline, settings, params) as early,
    ):
        assert early is not None and params["session_dir"] == str(early.session_dir)
        names = {c.name for c in (early.nodes.ahead.children + early.aggregator.ahead.children)}
        assert {"node0", "aggregator"} <= names
        pids = _running(early)
        assert len(pids) >= 2
        assert (early.session_dir / "dark.npy").is_file()  # written before the nodes started
        raise RuntimeError("Prefect's server never came up")
    assert wait_until(lambda: _gone(pids), timeout=10)
    assert not [p for t in early.state.process_tokens for p in carrying(t)]
    assert [m.name for m in timeline.marks] == [AHEAD_START, AHEAD_END]


def test_the_flow_takes_them_over_once_without_starting_others(settings: Settings) -> None:
    params = _params()
    early = launch(settings, params)
    assert early is not None
    try:
        pids = _running(early)
        log = _Log()
        taken = take(early.session_dir, flow_settings(settings, params), log)
        assert taken is early
        assert take(early.session_dir, flow_settings(settings, params), log) is None  # once
        ahead = early.nodes.ahead
        early.nodes.start(early.plan)  # the flow's allocate step: adopts, starts nothing
        early.aggregator.start(early.plan)
        assert early.nodes.group is ahead and early.nodes.ahead is None
        assert sorted(_running(early)) == sorted(pids)
        early.aggregator.record(early.state)
        assert early.state.aggregator_pid == early.aggregator.pid
    finally:
        early.stop()
    assert wait_until(lambda: _gone(pids), timeout=10)


def test_a_flow_with_other_settings_stops_them(settings: Settings) -> None:
    params = _params()
    early = launch(settings, params)
    assert early is not None
    pids = _running(early)
    log = _Log()
    other = flow_settings(settings, params | {"nodes": 2})
    assert take(early.session_dir, other, log) is None
    assert "other settings" in log.lines[0]
    assert wait_until(lambda: _gone(pids), timeout=10)


def test_another_backend_starts_nothing_ahead(settings: Settings) -> None:
    assert launch(settings, _params() | {"backend": "nersc"}) is None
    assert not (settings.output_dir / "sessions").exists()


@pytest.fixture
def dark_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty XDG cache of this test's own; the process's in-memory darks forgotten before and after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    simulated_dark_frame.cache_clear()
    yield tmp_path / "cache"
    simulated_dark_frame.cache_clear()


def test_the_simulated_dark_is_computed_once_per_user_and_read_back(dark_cache: Path) -> None:
    computed = simulated_dark_frame(4242)
    kept = dark_cache_file(4242)
    assert kept.is_relative_to(dark_cache) and np.array_equal(np.load(kept), computed)
    simulated_dark_frame.cache_clear()
    mark = np.full(FRAME_SHAPE, 3.5, np.float32)  # what the cache holds is what a session gets
    kept.unlink()
    np.save(kept, mark)
    again = simulated_dark_frame(4242)
    assert np.array_equal(again, mark) and not again.flags.writeable


def test_a_cached_dark_that_is_not_a_frame_is_recomputed_and_left_alone(dark_cache: Path) -> None:
    kept = dark_cache_file(4243)
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"not an array")
    dark = simulated_dark_frame(4243)
    assert dark.shape == FRAME_SHAPE and dark.dtype == np.float32
    assert kept.read_bytes() == b"not an array"  # never written over
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]  # no temporary file left


def test_the_cleanup_hook_finds_a_session_in_the_directory_it_was_given(
    settings: Settings, tmp_path: Path
) -> None:
    from flows.session import _cleanup_hook  # the hook of a crashed or cancelled run

    group = ProcessGroup(tmp_path / "logs")
    child = group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        session_dir = settings.output_dir / "sessions" / "chosen-by-the-cli"
        SessionState(session_dir, backend="local", process_tokens=[group.token]).save()
        run = SimpleNamespace(id="another-flow-run-id", parameters={"session_dir": str(session_dir)})
        _cleanup_hook(None, run, None)
        assert child.popen.wait(10) is not None
    finally:
        group.stop()
