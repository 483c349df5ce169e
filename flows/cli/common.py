"""What every `stemstream` command shares: the consoles, the one-line error handling, the settings a command
starts from (the global ``--settings`` file, the ``--set`` assignments) and small argument parsers.

The leaf of the CLI's modules (app -> command modules -> terminal -> common): it imports none of them,
and nothing heavier than typer, rich and the settings.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from counting.errors import StemstreamError
from flows.settings import Settings, assignment_overrides, load_settings, merge_overrides

console = Console()
err_console = Console(stderr=True)

# Failures a user can cause and fix: reported as one line, never as a traceback. StemstreamError is every
# error the product raises on purpose (counting/errors.py); OSError covers missing and unreadable files,
# ValueError bad values (the parsers' and the settings' validators). A KeyError or a bare RuntimeError is a
# bug: it keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (StemstreamError, ValueError, OSError)


def print_error(message: str) -> None:
    """One `error:` line on stderr; the message's own brackets ("[node0]", a path) are text, not markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected exceptions into one `error:` line and exit status 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):  # click's own exits (RuntimeError subclasses): not errors
            raise
        except ValidationError as exc:  # a bad setting: one line naming it, not pydantic's page
            print_error(setting_error(exc))
            raise typer.Exit(1) from None
        except USER_ERRORS as exc:
            print_error(str(exc))
            raise typer.Exit(1) from None

    return wrapper


def setting_error(exc: ValidationError) -> str:
    """A settings validation error as one line: the setting's dotted name, what is wrong, the value given."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"setting {where}: {first['msg']} (got {first.get('input')!r})"


def settings_file(ctx: typer.Context) -> Path | None:
    """The global ``--settings FILE`` of this invocation (kept on the root context), or None."""
    obj = ctx.find_root().obj
    return obj.get("settings_file") if isinstance(obj, dict) else None


def command_settings(ctx: typer.Context, assignments: list[str] | None = None, **overrides: Any) -> Settings:
    """The settings a command runs with: defaults < TOML < environment < the ``--settings`` file < the
    command's options (``overrides``, by section) < its ``--set SECTION.FIELD=VALUE`` assignments."""
    given = merge_overrides(overrides, assignment_overrides(parse_assignments(assignments)))
    return load_settings(settings_file(ctx), **given)


def parse_assignments(assignments: list[str] | None) -> dict[str, str]:
    """--set SECTION.FIELD=VALUE options as {"SECTION.FIELD": "VALUE"}; a malformed one is a usage error."""
    parsed = {}
    for item in assignments or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--set wants SECTION.FIELD=VALUE, got {item!r}")
        parsed[key.strip()] = value
    return parsed


def parse_scan(text: str) -> tuple[int, int]:
    """A scan size WIDTHxHEIGHT, both positive."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"scan size must look like 64x64, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise typer.BadParameter("scan width and height must be positive")
    return w, h


def check_threshold_pair(background: float | None, xray: float | None) -> None:
    """Fixed thresholds come as a pair or not at all."""
    if (background is None) != (xray is None):
        raise typer.BadParameter("give both --background-threshold and --xray-threshold, or neither")
