"""The `stemstream` command line (`python -m flows.cli`, the `stemstream` script): the root app and its
global options (app), one module per command group (catalogue, dark, keys, microscope, session,
streaming, view), the session's terminal (terminal: the embedded Prefect server, the run's settings file),
and what every command shares (common: consoles, one-line errors, settings; text: plain output)."""

from __future__ import annotations

from flows.cli.app import app, main, user_errors

__all__ = ["app", "main", "user_errors"]
