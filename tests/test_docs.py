"""The documentation site builds clean (MkDocs, --strict: every warning is an error), offline, with the CLI,
settings and message references generated from the code; the README stays a newcomer's two screens."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for this module exactly as `mkdocs build --strict` builds it."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, not a build warning
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    return out


def _text(site: Path, page: str) -> str:
    """A built page's text, unescaped (tags left in: names are searched, not layout)."""
    return html.unescape((site / page / "index.html").read_text())


def test_the_site_builds_strict_with_every_section(site):
    for page in ["getting-started", "guide/sessions", "guide/live-view", "guide/catalogue", "architecture"]:
        assert (site / page / "index.html").is_file(), page
    for page in ["benchmarks", "reliability", "reference/ports", "reference/hdf5", "reference/protocols"]:
        assert (site / page / "index.html").is_file(), page
    index = (site / "index.html").read_text()
    assert "fonts.googleapis.com" not in index  # theme.font: false, nothing fetched when read offline


def test_every_cli_command_and_option_is_in_the_generated_reference(site):
    import typer

    from flows.cli import app

    text = _text(site, "reference/cli")
    root = typer.main.get_command(app)
    stack = [("stemstream", root)]
    while stack:
        path, command = stack.pop()
        assert f"Usage: {path}" in text, path
        for param in command.params:
            for name in getattr(param, "opts", []):
                if name.startswith("--"):
                    assert name in text, f"{path} {name}"
        for name, sub in getattr(command, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                stack.append((f"{path} {name}", sub))


def test_every_setting_has_a_row_with_its_environment_variable(site):
    from pydantic import BaseModel

    from flows.settings import ENV_PREFIX, Settings

    rows_html = re.findall(r"<tr>(.*?)</tr>", _text(site, "reference/settings"), flags=re.DOTALL)
    cells = {re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)).strip() for row in rows_html}
    rows = 0
    stack: list[tuple[list[str], type[BaseModel]]] = [([], Settings)]
    while stack:
        path, model = stack.pop()
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                stack.append(([*path, name], field.annotation))
                continue
            env = ENV_PREFIX + "__".join([*path, name]).upper()
            dotted = ".".join([*path, name])
            assert any(row.startswith(f"{dotted} ") and f" {env} " in row for row in cells), env
            rows += 1
    assert rows > 100


def test_the_message_reference_lists_every_control_message(site):
    from streaming.protocol import control

    text = _text(site, "reference/messages")
    for cls, kind in control._KIND.items():
        assert f"{kind.decode()}: {cls.__name__}" in re.sub(r"</?code>", "", text), kind


def _hook():
    """docs/hooks/reference.py as MkDocs loads it (its directory on sys.path while it is imported)."""
    import importlib.util

    folder = ROOT / "docs" / "hooks"
    spec = importlib.util.spec_from_file_location("docs_reference_hook", folder / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_the_facility_guide_lists_the_pages_that_exist_in_reading_order(tmp_path):
    hook = _hook()
    nav = [{"Home": "index.md"}, {"Facility guide": []}, {"Reference": ["reference/cli.md"]}]
    assert hook.on_config({"docs_dir": str(tmp_path), "nav": [dict(e) for e in nav]})["nav"] == [
        nav[0],
        nav[2],
    ]  # no page yet: no empty section
    (tmp_path / "facility").mkdir()
    for name in ["upgrading", "zz-notes", "keys", "metrics", "aggregator-host"]:
        (tmp_path / "facility" / f"{name}.md").write_text(f"# {name}\n")
    got = hook.on_config({"docs_dir": str(tmp_path), "nav": [dict(e) for e in nav]})["nav"]
    order = ["aggregator-host", "keys", "metrics", "upgrading", "zz-notes"]
    assert got[1] == {"Facility guide": [f"facility/{n}.md" for n in order]}


CODE_PATH = re.compile(
    r"`((?:counting|streaming|catalogue|tasks|flows|tests|benchmarks|scripts|stemstream_testing|deploy|docs)"
    r"/[\w./-]+\.(?:py|json|yaml|toml|tmpl|sh|html|service|md))(?:::[^`]*)?`"
)


def test_every_file_the_pages_name_exists():
    # The pages name code, tests and benchmarks by path: a renamed or removed file must be renamed there too.
    named = {}
    for page in (ROOT / "docs").rglob("*.md"):
        for path in CODE_PATH.findall(page.read_text()):
            named.setdefault(path, page.relative_to(ROOT))
    assert len(named) > 30
    missing = {path: str(page) for path, page in named.items() if not (ROOT / path).exists()}
    assert not missing, missing


def test_the_readme_is_two_screens_with_the_commands_ci_runs_and_links_that_resolve():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines: move the detail into docs/"
    for marker, needle in (("<!-- main-command -->", "stemstream demo"), ("<!-- test-command -->", "pytest")):
        at = lines.index(marker)  # .ci/run takes the second line after the marker
        assert lines[at + 1] == "```bash" and needle in lines[at + 2], marker
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert len(links) >= 10, "the README links into docs/"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
