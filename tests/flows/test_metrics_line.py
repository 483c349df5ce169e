"""The session's ``metrics:`` line (flows.cli.terminal): once the session is ready, where Prometheus scrapes
each of its processes, from their own ``metrics:`` lines; not before the live view has printed its own."""

from __future__ import annotations

import time
from pathlib import Path

from flows.cli.terminal import SessionWatcher
from tasks.launch.state import SessionState


def test_the_session_prints_its_processes_metrics_once_ready(tmp_path: Path) -> None:
    session_dir = tmp_path / "sessions" / "run"
    logs = session_dir / "logs"
    logs.mkdir(parents=True)
    (logs / "aggregator.log").write_text("started\nmetrics: http://127.0.0.1:17300/metrics\n")
    (logs / "node-0.log").write_text("metrics: http://127.0.0.1:17310/metrics\nnode ready\n")
    (logs / "view.log").write_text("live: http://127.0.0.1:17080/\n")
    state = SessionState(session_dir)
    state.save()
    lines: list[str] = []
    watcher = SessionWatcher(tmp_path / "sessions", time.time() - 60, lines.append)
    watcher.poll()
    assert lines == ["live: http://127.0.0.1:17080/"]  # not ready: no metrics line yet
    state.ready, state.receivers = True, ["tcp://127.0.0.1:6001"]
    state.save()
    watcher.poll()
    assert lines[1:] == ["ready: receivers tcp://127.0.0.1:6001"]  # the view has not printed its metrics
    with open(logs / "view.log", "a") as f:
        f.write("metrics: http://127.0.0.1:17301/metrics\n")
    watcher.poll()
    watcher.poll()
    assert lines[2:] == [
        "metrics: http://127.0.0.1:17300/metrics http://127.0.0.1:17310/metrics http://127.0.0.1:17301/metrics"
    ]
