"""The message reference page, generated from streaming.protocol: the sector header, the control messages
(aggregator <-> nodes, nodes -> scan writer), the forwarder messages and the live and tap messages."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any

from docgen_text import GENERATED_NOTE, cell, code, table

_BOUNDS = (
    ("ge", "≥"),
    ("gt", ">"),
    ("le", "≤"),
    ("lt", "<"),
    ("min_length", "len ≥"),
    ("max_length", "len ≤"),
)
_COMMENT = re.compile(r"^\s+(\w+)\s*[:=].*#\s*(.+)$")


def render() -> str:
    """The message reference as Markdown."""
    from streaming.protocol import control, live, paths, record, sector

    lines = [
        "# Message reference",
        "",
        GENERATED_NOTE.format(source="streaming.protocol", hook="docgen_protocol.py"),
        "Every message stemstream's processes exchange, with each field's type (and range, as the decoders "
        "check it) and default. What the messages are for, who sends them and over which socket: "
        "[Protocols](protocols.md) and [Every port](ports.md).",
        "",
    ]
    lines += _sector(sector)
    lines += _messages(
        "Control messages: aggregator, nodes, monitors and the scan writer",
        control,
        control._KIND,
        f"Protocol version {control.PROTOCOL_VERSION}. Each message is `[kind, msgpack map]`; the map's "
        "keys are the fields below (unknown or missing required fields, wrong types and out-of-range values "
        "are refused and counted).",
    )
    lines += _messages(
        "Forwarder messages: the aggregator and its forwarding processes",
        paths,
        paths._KIND,
        "Over the aggregator's internal loopback hub; `[kind, msgpack map]`.",
    )
    lines += _live(live)
    lines += _record(record)
    return "\n".join(lines)


def _sector(module: Any) -> list[str]:
    lines = ["## The sector message (receivers → aggregator → nodes)", ""]
    lines += ["```text", inspect.getdoc(module) or "", "```", ""]
    rows = [[str(i), code(name), code(limit)] for i, (name, limit) in enumerate(module._LIMITS)]
    lines += table(["position", "field", "largest value accepted"], rows)
    lines += [
        f"A data-path message part may be at most {module.MAX_MESSAGE_BYTES:,} bytes (`ZMQ_MAXMSGSIZE`); "
        "a scan must have a non-zero width and height and the position must lie inside it.",
        "",
    ]
    return lines


def _messages(title: str, module: Any, kinds: dict[type, bytes], intro: str) -> list[str]:
    lines = [f"## {title}", "", intro, "", "```text", inspect.getdoc(module) or "", "```", ""]
    for cls, kind in kinds.items():
        lines += [f"### `{kind.decode()}`: `{cls.__name__}`", "", cell(inspect.getdoc(cls) or ""), ""]
        lines += table(["field", "type", "default", "note"], _fields(cls))
    return lines


def _fields(cls: type) -> list[list[str]]:
    """[name, type, default, comment] of a message dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    comments = _comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        rows.append([code(f.name), cell(_type(hints[f.name])), _default(f), cell(comments.get(f.name, ""))])
    return rows


def _comments(cls: type) -> dict[str, str]:
    """The trailing comments of a class's field lines: the code's own notes on each field."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = {}
    for line in source.splitlines():
        match = _COMMENT.match(line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def _type(hint: Any) -> str:
    """A field's type with msgspec's range metadata (ge/le/max_length...)."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        bounds = []
        for meta in extras:
            for attr, sign in _BOUNDS:
                value = getattr(meta, attr, None)
                if value is not None:
                    bounds.append(f"{sign} {value}")
        return f"{_type(base)} ({', '.join(bounds)})" if bounds else _type(base)
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type(a) for a in args)
    if hint is type(None):
        return "None"
    if args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return code(repr(f.default))
    if f.default_factory is not dataclasses.MISSING:
        return code(repr(f.default_factory()))
    return "required"


def _live(module: Any) -> list[str]:
    lines = ["## Live view and counted-data tap messages", "", "```text", inspect.getdoc(module) or ""]
    lines += ["```", ""]
    rows = [[code(name), code(dtype)] for name, dtype in module.TAP_ARRAYS]
    lines += ["Arrays of a `tap.events` message, in order:", ""]
    lines += table(["array", "dtype (numpy)"], rows)
    dtypes = ", ".join(f"`{d}`" for d in sorted(module.DTYPES))
    lines += [
        f"Array dtypes a live message may carry: {dtypes}. Live phase contrast: at most "
        f"{module.PARALLAX_MAX_SIDE} bins per side, {module.PARALLAX_MAX_CELLS:,} positions × bins per node.",
        "",
    ]
    return lines


def _record(module: Any) -> list[str]:
    """The stop record, ``<scan file>.json`` beside each streamed scan."""
    lines = [
        "## The stop record (`<scan file>.json`)",
        "",
        "```text",
        inspect.getdoc(module) or "",
        "```",
        "",
    ]
    lines += [cell(inspect.getdoc(module.ScanRecord) or ""), ""]
    lines += table(["field", "type", "default", "note"], _fields(module.ScanRecord))
    comments = _comments(module.ScanStatus)
    rows = [[code(s.value), cell(comments.get(s.name, ""))] for s in module.ScanStatus]
    lines += ["`status` is one of:", ""] + table(["status", "meaning"], rows)
    return lines


if __name__ == "__main__":
    print(render())
