"""The CLI reference page, generated from the typer app (flows.cli) by walking its click command tree."""

from __future__ import annotations

from typing import Any

import typer
from docgen_text import GENERATED_NOTE, cell, code, table

try:  # typer >= 0.26 ships its own click
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer on plain click
    import click


def render() -> str:
    """The whole CLI reference as Markdown."""
    from flows.cli import app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="stemstream")
    lines = [
        "# CLI reference",
        "",
        GENERATED_NOTE.format(source="flows.cli", hook="docgen_cli.py"),
        "Every command of `stemstream`, its usage, help and every option and argument with its type and "
        "default. Options of the top level (`--settings`, `--settings-sha256`) go before the command.",
        "",
    ]
    lines += _command(root, ctx, "stemstream", level=2)
    return "\n".join(lines)


def _command(command: Any, ctx: Any, path: str, level: int) -> list[str]:
    """One command's section, then its subcommands' (a group's), in name order."""
    lines = [f"{'#' * level} `{path}`", ""]
    lines += ["```text", command.get_usage(ctx), "```", ""]
    if command.help:
        lines += [_help_text(command.help), ""]
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    if params:
        rows = [_param_row(p, ctx) for p in params]
        lines += table(["option / argument", "type", "default", "help"], rows)
    subcommands = getattr(command, "commands", {})
    if subcommands:
        names = ", ".join(f"`{name}`" for name in sorted(subcommands))
        lines += [f"Commands: {names}.", ""]
        for name in sorted(subcommands):
            sub = subcommands[name]
            if getattr(sub, "hidden", False):
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            lines += _command(sub, sub_ctx, f"{path} {name}", level=min(level + 1, 4))
    return lines


def _help_text(text: str) -> str:
    """A command's help as a paragraph (typer's own line breaks are kept as Markdown line breaks)."""
    paragraphs = [" ".join(block.split()) for block in text.strip().split("\n\n")]
    return "\n\n".join(p.replace("<", "&lt;").replace(">", "&gt;") for p in paragraphs)


def _param_row(param: Any, ctx: Any) -> list[str]:
    """[names, type, default, help] of one option or argument."""
    if param.param_type_name == "argument":
        names = param.name.upper() + ("…" if param.nargs == -1 else "")
    else:
        names = ", ".join([*param.opts, *getattr(param, "secondary_opts", [])])
    kind = param.display_type(ctx).strip("<>") if hasattr(param, "display_type") else str(param.type)
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", []):
        kind = "flag"
    default = "required" if param.required else _default(param.default)
    return [code(names), cell(kind), default, cell(getattr(param, "help", None) or "")]


def _default(value: object) -> str:
    if value is None or value == ():
        return "—"
    if isinstance(value, list | tuple):
        value = " ".join(str(v) for v in value)
    return code(value)


if __name__ == "__main__":
    print(render())
