"""The settings reference page, generated from the pydantic models (flows.settings.Settings and its sections)."""

from __future__ import annotations

import enum
import json
import re
import typing
from pathlib import PurePath
from typing import Any

from docgen_text import GENERATED_NOTE, cell, code, table
from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "min length"))
_BOUNDS += (("max_length", "max length"),)


def render() -> str:
    """The whole settings reference as Markdown."""
    from flows import settings as module

    prefix = module.ENV_PREFIX
    delimiter = module.Settings.model_config.get("env_nested_delimiter") or "__"
    lines = [
        "# Settings reference",
        "",
        GENERATED_NOTE.format(source="flows.settings.Settings", hook="docgen_settings.py"),
        "Every setting, by its dotted name: its type (and bounds), its default, the environment variable "
        f"that sets it (`{prefix}` + section + `{delimiter}` + field, any case) and what it does. The same "
        "name is a key of the TOML file (`[section]`, then `field = value`) and of "
        "`stemstream session --set section.field=VALUE`. Lists and mappings are given as JSON in the "
        "environment. Precedence and the settings file of a session: see "
        "[Configuration](../guide/configuration.md).",
        "",
    ]
    sections = _sections(module.Settings, [])
    lines += ["| section | what it is |", "|---|---|"]
    for path, model in sections:
        name = ".".join(path) or "(top level)"
        lines.append(f"| [{cell(name)}](#{_anchor(path)}) | {cell(_first_line(model))} |")
    lines.append("")
    for path, model in sections:
        lines += _section(path, model, prefix, delimiter)
    return "\n".join(lines)


def _sections(model: type[BaseModel], path: list[str]) -> list[tuple[list[str], type[BaseModel]]]:
    """The model and every nested section below it, depth first."""
    found = [(path, model)]
    for name, field in model.model_fields.items():
        sub = _model(field.annotation)
        if sub is not None:
            found += _sections(sub, [*path, name])
    return found


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _anchor(path: list[str]) -> str:
    return "section-" + ("-".join(path) if path else "top-level")


def _first_line(model: type) -> str:
    doc = (model.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def _section(path: list[str], model: type[BaseModel], prefix: str, delimiter: str) -> list[str]:
    title = ".".join(path) if path else "Top level"
    lines = [f"## {title} {{#{_anchor(path)}}}", "", f"`{model.__name__}`: {cell(_first_line(model))}", ""]
    rows = []
    for name, field in model.model_fields.items():
        if _model(field.annotation) is not None:
            continue
        dotted = ".".join([*path, name])
        env = prefix + delimiter.join([*path, name]).upper()
        names = f"{code(dotted)}<br>{code(env)}"
        rows.append([names, cell(_type(field)), _default(field), cell(field.description or "")])
    if rows:
        lines += table(["setting, environment variable", "type", "default", "description"], rows)
    return lines


def _type(field: Any) -> str:
    """The annotation, readable, with its bounds (ge/gt/le/lt) when the field has any."""
    text = _annotation(field.annotation)
    bounds = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _annotation(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = repr(annotation)
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r"<enum '(\w+)'>", r"\1", text)
    return re.sub(r"\b(?:typing|pathlib|pydantic\.types|collections\.abc|[a-z_]+(?:\.[a-z_]+)*)\.", "", text)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that wants the validated data: say so rather than guess
            return "computed"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return code(_plain(value))


def _plain(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, PurePath | str):
        return str(value) or '""'
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


if __name__ == "__main__":
    print(render())
