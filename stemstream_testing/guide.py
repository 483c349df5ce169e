"""The facility guide's command blocks, for the test that keeps the guide from rotting.

A fenced block in a docs/facility page is marked by an HTML comment on the line(s) before it (a blank line
between them, so Markdown keeps the fence a fence):

* ``<!-- guide: run expect="TEXT" ... -->``: run by the test in a sandbox (a temporary HOME and working
  directory, loopback only, a time limit), the page's run blocks in order in one directory; it must exit 0
  and print every ``expect`` text (stdout and stderr together).
* ``<!-- guide: parse -->``: needs a real facility (systemd as PID 1, root, NERSC, a Prefect server): the
  test checks the shell syntax (``bash -n``) and that every ``stemstream`` and ``prefect`` command in it
  parses with the real command-line parser (options known, values of the right type).
* ``<!-- guide: settings -->`` on a ``toml`` block: every key is a setting and every value valid
  (the real Settings model).
* ``<!-- guide: output -->`` on a ``text`` block: a sample of what the run block before it printed; each of
  its lines must be a line of that block's output (keys, which differ on every run, masked: ``masked``).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

MARK = re.compile(r"<!--\s*guide:\s*(run|parse|settings|output)\b(.*?)-->", re.S)
EXPECT = re.compile(r'expect="([^"]*)"')
FENCE = re.compile(r"^```(\w*)\s*$")
SEPARATORS = {"&&", "||", ";", "|", "&"}
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
REDIRECT = re.compile(r"(?<![\w-])\d*(?:>>?|<)(?:&\d+|\s*[^\s;&|<>]+)")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: its language, its text, how it is checked (None: unmarked)."""

    page: str
    line: int
    lang: str
    text: str
    kind: str | None
    expect: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """page:line, for failure messages."""
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with the guide marker that precedes it (if any)."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    pending: tuple[str, tuple[str, ...]] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        mark = MARK.search(line)
        if mark:
            pending = (mark.group(1), tuple(EXPECT.findall(mark.group(2))))
        fence = FENCE.match(line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            kind, expect = pending if pending else (None, ())
            text = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Block(path.name, i + 1, fence.group(1), text, kind, expect))
            pending, i = None, end + 1
            continue
        if line.strip() and not mark:
            pending = None  # a marker holds only for the fence right after it
        i += 1
    return found


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments, redirections and here-document
    bodies dropped, split at ``&&``, ``||``, ``;``, ``|`` and ``&``; leading ``VAR=value``, ``env`` and
    ``sudo -u USER`` removed."""
    out: list[list[str]] = []
    heredoc: str | None = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        opened = HEREDOC.search(line)
        if opened:
            heredoc, line = opened.group(1), line[: opened.start()]
        line = REDIRECT.sub(" ", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS or set(token) <= set(";&|"):
                if current:
                    out.append(_strip_prefix(current))
                current = []
            else:
                current.append(token)
    return [c for c in out if c]


def _strip_prefix(argv: list[str]) -> list[str]:
    """Drop what only sets up the command: VAR=value, env, sudo [-u USER], exec."""
    while argv:
        head = argv[0]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", head) or head in ("env", "exec"):
            argv = argv[1:]
        elif head == "sudo":
            argv = argv[3:] if argv[1:2] == ["-u"] else argv[1:]
        else:
            break
    return argv


def parse_stemstream(args: list[str]) -> dict:
    """Parse `stemstream ARGS` with the real CLI's parser (typer's click; nothing runs); raises its usage
    error if it fails. Returns the innermost command's parameters ({"help": True} for --help)."""
    import typer

    from flows.cli import app

    command = typer.main.get_command(app)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # --help prints the page and exits 0: accepted
            ctx = command.make_context("stemstream", list(args))
            while hasattr(command, "get_command"):  # a group: descend into the named subcommand
                rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
                if not rest:
                    break
                sub = command.get_command(ctx, rest[0])
                if sub is None:
                    raise LookupError(f"no such command {rest[0]!r}")
                command, ctx = sub, sub.make_context(rest[0], rest[1:], parent=ctx)
    except typer.Exit as done:
        if done.exit_code != 0:
            raise
        return {"help": True}
    return dict(ctx.params)


def parse_prefect(args: list[str]) -> dict:
    """Parse `prefect ARGS` with Prefect's own parser (cyclopts; nothing runs); raises if it fails."""
    from prefect.cli._app import _app

    rest, i = [], 0
    while i < len(args):  # the root's session options are parsed by its meta app, not the commands
        if args[i] in ("--no-prompt", "--prompt"):
            i += 1
        elif args[i] == "--profile":
            i += 2
        else:
            rest.append(args[i])
            i += 1
    _, bound, _ = _app.parse_args(rest, exit_on_error=False, print_error=False)
    return dict(bound.arguments)


def unknown_settings(data: dict, model: type, prefix: str = "") -> list[str]:
    """Dotted names in a TOML settings table that the settings model has no field for."""
    from pydantic import BaseModel

    unknown = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(prefix + key)
            continue
        inner = field.annotation
        if isinstance(value, dict) and isinstance(inner, type) and issubclass(inner, BaseModel):
            unknown += unknown_settings(value, inner, f"{prefix}{key}.")
    return unknown


Z85_KEY = re.compile(r"(?<=public )\S{40}")


def masked(text: str) -> list[str]:
    """Lines of a command's output with the z85 keys (different on every run) replaced, stripped."""
    return [Z85_KEY.sub("KEY", line).rstrip() for line in text.splitlines() if line.strip()]
