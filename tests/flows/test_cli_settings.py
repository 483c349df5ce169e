"""How a command builds its settings: the global --settings file, the command's options and --set, with
nothing written to the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flows.cli.common import command_settings, user_errors
from flows.settings import Settings, assignment_overrides, load_settings, write_settings_file


def _settings_of(args: list[str], assignments: list[str] | None = None, **overrides: object) -> Settings:
    """The settings a command sees when invoked with the global options ``args``."""
    app = typer.Typer()
    seen: dict[str, Settings] = {}

    @app.callback()
    def _root(ctx: typer.Context, settings: Path | None = typer.Option(None, "--settings")) -> None:
        ctx.obj = {"settings_file": settings}  # as flows.cli's global option keeps it

    @app.command()
    @user_errors
    def probe(ctx: typer.Context) -> None:
        seen["settings"] = command_settings(ctx, assignments, **overrides)

    result = CliRunner().invoke(app, [*args, "probe"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen["settings"]


@pytest.fixture
def toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "stemstream.toml").write_text("[session]\nnodes = 3\nscan_timeout = 7.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STEMSTREAM_CONFIG", raising=False)
    monkeypatch.setenv("STEMSTREAM_SESSION__NODES", "4")
    monkeypatch.setenv("STEMSTREAM_SESSION__MIN_COMPLETENESS", "0.5")
    return tmp_path


def test_set_wins_over_the_environment_and_the_toml_file_and_writes_no_environment(
    toml_and_env: Path,
) -> None:
    before = dict(os.environ)
    s = _settings_of([], ["session.nodes=5", 'streaming.receivers=["tcp://127.0.0.1:7001"]'])
    assert s.session.nodes == 5  # --set over the environment (4) and the TOML file (3)
    assert s.streaming.receivers == ["tcp://127.0.0.1:7001"]  # a list, as its variable would be parsed
    assert s.session.min_completeness == 0.5 and s.session.scan_timeout == 7.0  # the rest as before
    assert dict(os.environ) == before


def test_the_settings_file_wins_over_the_environment_and_options_and_set_win_over_it(
    toml_and_env: Path,
) -> None:
    path = write_settings_file(
        load_settings(session={"nodes": 6, "scan_timeout": 9.0}), toml_and_env / "s.json"
    )
    s = _settings_of(["--settings", str(path)])
    assert (s.session.nodes, s.session.scan_timeout) == (6, 9.0)
    s = _settings_of(["--settings", str(path)], ["session.nodes=8"], session={"scan_timeout": 11.0})
    assert (s.session.nodes, s.session.scan_timeout) == (8, 11.0)


def test_assignments_parse_as_their_environment_variables_would() -> None:
    assert assignment_overrides({}) == {}
    overrides = assignment_overrides({"analysis.keep_flyback": "true", "streaming.live.enabled": "false"})
    s = load_settings(**overrides)
    assert s.analysis.keep_flyback is True and s.streaming.live.enabled is False
    assert assignment_overrides({"no_such.setting": "1"}) == {}  # ignored, as STEMSTREAM_NO_SUCH__SETTING is


def test_a_bad_set_value_is_one_error_line_naming_the_setting(toml_and_env: Path) -> None:
    app = typer.Typer()

    @app.command()
    @user_errors
    def probe(ctx: typer.Context) -> None:
        command_settings(ctx, ["analysis.keep_flyback=maybe"])

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: setting analysis.keep_flyback:"), result.output
