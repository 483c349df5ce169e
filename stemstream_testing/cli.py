"""`stemstream` for the tests: in this process (typer's CliRunner) or as a subprocess, with the same result
shape, so a test file can run most of its commands in process and keep one real process start as a smoke
test of the entry point."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from stemstream_testing.support import CLI

SETTINGS_PREFIX = "STEMSTREAM_"


@dataclass(frozen=True)
class Ran:
    """What a command did: its exit status and what it printed on each stream."""

    returncode: int
    stdout: str
    stderr: str


def in_process(args: list[str], env: Mapping[str, str], cwd: Path | None = None) -> Ran:
    """`stemstream ARGS` in this process (in cwd, if given): env is the whole STEMSTREAM_ environment the
    command sees (any other STEMSTREAM_ variable of this process is hidden from it) plus other variables to
    set, e.g. COLUMNS. An unexpected exception propagates (a traceback a user would see fails the test)."""
    from typer.testing import CliRunner

    from flows.cli import app

    hidden: dict[str, str | None] = {k: None for k in os.environ if k.startswith(SETTINGS_PREFIX)}
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext(), _width(env.get("COLUMNS")):
        result = CliRunner().invoke(app, args, env=hidden | dict(env), catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


@contextlib.contextmanager
def _width(columns: str | None) -> Iterator[None]:
    """The CLI's consoles as wide as env's COLUMNS while a command runs: they fix their width when created
    if COLUMNS is set then (as in a pytest-xdist worker: 80), and a real process reads it at its start."""
    from flows.cli.common import console, err_console

    if columns is None or not columns.isdigit():
        yield
        return
    before = console._width, err_console._width  # None: sized from the environment at each print
    console.width = err_console.width = int(columns)
    try:
        yield
    finally:
        console.width, err_console.width = before


def as_process(args: list[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 180) -> Ran:
    """`python -m flows.cli ARGS` as a subprocess, with this environment less its STEMSTREAM_ variables,
    plus env."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIX)} | dict(env)
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, env=full, cwd=cwd, timeout=timeout)
    return Ran(r.returncode, r.stdout, r.stderr)
