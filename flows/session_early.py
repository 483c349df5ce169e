"""A local session's processes started by the CLI while Prefect's server starts, then handed to its flow.

Without this, the node streamers, the aggregator and the live view start only once the flow run has begun,
after Prefect's server is up: two blocks of Python start-ups one after the other. Here the CLI decides the
session's identity itself, before any flow run exists (its directory ``sessions/<uuid>``, its number, dark,
settings, plan and settings file: flows/session_identity.py, without Prefect), starts the processes, and
gives the flow that directory (its ``session_dir`` parameter); the flow, in the same process, takes them
(``take``) instead of starting its own, and its release stops them as it stops its own.

Every way out stops them: the flow's release once it has taken them; else the CLI's ``finally``
(``EarlyLaunch.stop``: Prefect's server failed, the flow never began or did not take them, Ctrl-C); a
SIGTERM or SIGKILL of the CLI through their parent-death signal (tasks.launch.processes); the session's
state file lists their tokens from the start (its cleanup hook, ``stemstream`` cleanup). Starting them is an
optimisation: a failure stops what it started and the flow starts them as before, and says why it fails.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flows.session_identity import (
    SIMULATED_DARK,
    session_number,
    session_plan,
    session_settings,
    simulated_dark,
    stored_dark,
)
from flows.settings import Settings, given, merge_overrides, settings_json
from tasks.launch.backends import LocalAggregator, LocalNodes
from tasks.launch.plan import SessionPlan
from tasks.launch.state import SessionState

log = logging.getLogger(__name__)

# Processes started ahead, by session directory, until the flow takes them (one CLI, one session).
_LAUNCHED: dict[Path, EarlyLaunch] = {}
_LOCK = threading.Lock()


class _Notes:
    """A logger's ``warning`` that keeps the set-up's warnings for the flow's run log (the UI shows them)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, message: str, *args: object) -> None:
        """Keep one warning."""
        self.lines.append(message % args if args else message)


@dataclass
class EarlyLaunch:
    """A session set up and its local processes started before its flow run exists."""

    run_id: str  # the session directory's name (the flow records its own run id beside it)
    base: Settings  # the settings the flow will load (what take() checks)
    settings: Settings  # the session's: node count, id, dark, addresses
    dark: Path | None
    plan: SessionPlan
    state: SessionState
    nodes: LocalNodes = field(default_factory=LocalNodes)
    aggregator: LocalAggregator = field(default_factory=LocalAggregator)
    notes: list[str] = field(default_factory=list)  # the set-up's warnings, for the flow's log

    @property
    def session_dir(self) -> Path:
        """The session's directory (the flow's ``session_dir`` parameter)."""
        return self.plan.session_dir

    def stop(self) -> None:
        """Stop whatever is still running of them (nothing once the flow's release has): idempotent."""
        with _LOCK:
            _LAUNCHED.pop(self.session_dir, None)
        try:
            self.aggregator.stop()
        finally:
            self.nodes.stop()


def flow_settings(settings: Settings, params: dict) -> Settings:
    """The settings the session flow will run with: the CLI's, as its settings file carries them, with the
    flow parameters that override them (flows/session_setup.run_settings)."""
    session = given(
        backend=params.get("backend"),
        nodes=params.get("nodes"),
        postprocess=params.get("postprocess"),
        min_completeness=params.get("min_completeness"),
    )
    data = json.loads(settings_json(settings))
    return Settings(**merge_overrides(data, {"session": session} if session else {}))


def launch(settings: Settings, params: dict) -> EarlyLaunch | None:
    """A local session's directory, settings and plan decided now and its processes started; None where
    the session does not run them here (another backend) or starting them failed (the flow will)."""
    if params.get("backend") != "local":
        return None
    try:
        return _launch(flow_settings(settings, params), params.get("camera") == "simulated")
    except Exception as exc:  # an optimisation: the flow starts them as before, and says why it fails
        log.warning("could not start the session's processes ahead (the flow starts them): %s", exc)
        return None


def _launch(base: Settings, simulated: bool) -> EarlyLaunch:
    """Set up and start; on a failure, what was started is stopped before the error goes on."""
    run_id = str(uuid.uuid4())
    session_dir = (base.output_dir / "sessions" / run_id).resolve()
    session_dir.mkdir(parents=True, exist_ok=True)
    notes = _Notes()
    dark = stored_dark(base, simulated, notes)
    compute_dark = dark is None and simulated  # written before the nodes start (they read it), no sooner
    if compute_dark:
        dark = session_dir / SIMULATED_DARK
    settings = session_settings(base, dark, session_number(run_id), simulated)
    plan = session_plan(settings, session_dir)
    state = SessionState(
        session_dir, backend="local", settings_file=str(plan.settings_file), scans_dir=str(plan.output_dir)
    )
    launched = EarlyLaunch(run_id, base, settings, dark, plan, state, notes=notes.lines)
    with _LOCK:
        _LAUNCHED[session_dir] = launched
    try:  # the aggregator and live view first: they do not read the dark, which is computed meanwhile
        launched.aggregator = LocalAggregator.started_ahead(plan)
        launched.aggregator.record(state)
        state.save()  # their token, before the next start: the cleanup hook finds them
        if compute_dark:
            simulated_dark(session_dir, base.simulator.seed)
        launched.nodes = LocalNodes.started_ahead(plan)
        launched.nodes.record(state)
        state.save()
    except BaseException:
        launched.stop()
        raise
    return launched


def take(session_dir: Path, settings: Settings, run_log) -> EarlyLaunch | None:
    """The processes started ahead for this session directory, for its flow to adopt (once); None if there
    are none. Started with other settings than the flow's: stopped (the flow starts its own, and says so)."""
    with _LOCK:
        launched = _LAUNCHED.pop(Path(session_dir).resolve(), None)
    if launched is None:
        return None
    if launched.base.model_dump(mode="json") != settings.model_dump(mode="json"):
        run_log.warning("the processes started ahead had other settings than this run's: started again")
        launched.stop()
        return None
    for note in launched.notes:
        run_log.warning(note)
    return launched
