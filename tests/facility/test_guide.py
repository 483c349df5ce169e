"""The facility guide cannot rot: every command block of docs/facility/ is run in a sandbox or, where it
needs a real facility, parsed by the real parsers; its settings examples are valid settings; the systemd
units pass `systemd-analyze verify` and their ExecStart lines parse (stemstream_testing/guide.py)."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest

from stemstream_testing.guide import (
    Block,
    blocks,
    commands,
    masked,
    parse_prefect,
    parse_stemstream,
    unknown_settings,
)

ROOT = Path(__file__).resolve().parents[2]
FACILITY = ROOT / "docs" / "facility"
PAGES = ["index.md", "aggregator-host.md", "keys.md", "nersc.md", "prefect.md", "upgrading.md"]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
VENV_BIN = ROOT / ".venv" / "bin"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
BLOCK_TIMEOUT = 60  # seconds; each run block takes 1-4 s


def _blocks(kind: str | None = None) -> list[Block]:
    found = [b for page in PAGES for b in blocks(FACILITY / page)]
    return [b for b in found if kind is None or b.kind == kind]


def _free_base() -> int:
    """A port P with P, P+1, P+2 free on loopback (the blocks bind those)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 2 > 65535:
            continue
        try:
            for port in (base + 1, base + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no three consecutive free ports on loopback")


def test_every_shell_block_is_marked_and_every_page_says_what_is_checked():
    unmarked = [b.where for b in _blocks() if b.lang in SHELL_LANGS and b.kind is None]
    assert not unmarked, f"shell blocks without a <!-- guide: run|parse --> marker: {unmarked}"
    wrong = [b.where for b in _blocks("settings") if b.lang != "toml"]
    assert not wrong, f"settings markers on non-toml blocks: {wrong}"
    for page in PAGES[1:]:
        assert "**Checked here:**" in (FACILITY / page).read_text(), page
    assert len(_blocks("run")) >= 10 and len(_blocks("parse")) >= 15


RUN_PAGES = sorted({b.page for b in _blocks("run")})


def test_output_samples_follow_a_run_block():
    for page in PAGES:
        found = blocks(FACILITY / page)
        for i, block in enumerate(found):
            if block.kind == "output":
                assert any(b.kind == "run" for b in found[:i]), block.where


@pytest.mark.parametrize("page", RUN_PAGES)
def test_run_blocks_run_in_a_sandbox(page, tmp_path):
    """A page's run blocks, in order, in one sandbox directory: exit 0, every expected text printed."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    (work / "stemstream-output").mkdir(parents=True)
    env = {
        "HOME": str(home),
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "COLUMNS": "200",
        "TERM": "dumb",
        "STEMSTREAM_REPO": str(ROOT),
        "PREFECT_HOME": str(home / ".prefect"),
        "DO_NOT_TRACK": "1",
        "P": str(_free_base()),
    }
    printed = ""
    for block in blocks(FACILITY / page):
        if block.kind == "output":  # a sample of what the run block before it printed: still true
            stale = [line for line in masked(block.text) if line not in masked(printed)]
            assert not stale, f"{block.where}: the sample shows lines the command no longer prints: {stale}"
            continue
        if block.kind != "run":
            continue
        r = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.text],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
        printed = r.stdout + r.stderr
        assert r.returncode == 0, f"{block.where} exited {r.returncode}:\n{printed[-3000:]}"
        missing = [text for text in block.expect if text not in printed]
        assert not missing, f"{block.where} did not print {missing}:\n{printed[-3000:]}"
        assert "Traceback" not in printed, f"{block.where}:\n{printed[-3000:]}"


def test_parse_blocks_are_valid_shell_and_every_command_parses():
    """Blocks that need a facility: bash -n, and each stemstream/prefect command through the real parser."""
    parsed = {"stemstream": 0, "prefect": 0}
    failures = []
    for block in _blocks("parse"):
        syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
        if syntax.returncode:
            failures.append(f"{block.where}: bash -n: {syntax.stderr.strip()}")
        for argv in commands(block.text):
            program = Path(argv[0]).name
            if program not in parsed:
                continue
            try:
                (parse_stemstream if program == "stemstream" else parse_prefect)(argv[1:])
                parsed[program] += 1
            except Exception as exc:  # any parser's refusal: report them all at once
                failures.append(f"{block.where}: {shlex.join(argv)}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    assert parsed["stemstream"] >= 8 and parsed["prefect"] >= 15, parsed


def test_the_parse_check_refuses_what_the_cli_would_refuse():
    """The parser check is real: an unknown option or a wrong type fails, as on the command line."""
    parse_stemstream(["aggregator", "--nodes", "4", "--timeout", "5"])
    for bad in (["aggregator", "--node", "4"], ["aggregator", "--nodes", "four"], ["keys", "generate"]):
        with pytest.raises(Exception):  # noqa: B017 (click's UsageError or BadParameter)
            parse_stemstream(bad)
    parse_prefect(["--no-prompt", "worker", "start", "--pool", "stemstream-local", "--limit", "1"])
    with pytest.raises(Exception):  # noqa: B017 (cyclopts' UnknownOptionError)
        parse_prefect(["worker", "start", "--pol", "stemstream-local"])
    assert commands("A=1 sudo -u stemstream env B=2 stemstream --help && prefect version | tee x") == [
        ["stemstream", "--help"],
        ["prefect", "version"],
        ["tee", "x"],
    ]


def test_settings_examples_are_valid_settings():
    from flows.settings import Settings

    examples = _blocks("settings")
    assert len(examples) >= 3
    for block in examples:
        data = tomllib.loads(block.text)
        assert unknown_settings(data, Settings) == [], block.where
        Settings.model_validate(data)  # every value valid (no environment, no file: only the example)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_units_verify_and_their_commands_parse(unit, tmp_path):
    """systemd-analyze verify (the binaries pointed at this checkout's venv, as installed they are under
    /opt/stemstream), and ExecStart parsed by the real CLI."""
    assert shutil.which("systemd-analyze"), "systemd-analyze (Debian's systemd package) is needed"
    local = tmp_path / unit.name
    local.write_text(unit.read_text().replace("/opt/stemstream/.venv/bin/", f"{VENV_BIN}/"))
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(local)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    config = configparser.ConfigParser(strict=False, interpolation=None)
    config.optionxform = str  # systemd keys are case-sensitive
    config.read_string(unit.read_text())
    service = config["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].startswith("/opt/stemstream/.venv/bin/")
    program = Path(argv[0]).name
    (parse_stemstream if program == "stemstream" else parse_prefect)(argv[1:])
    assert service["User"] == "stemstream" and service["Restart"] == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes"}.items():
        assert service[key] == value, (unit.name, key)
    assert "/var/lib/stemstream" in service["ReadWritePaths"]


def test_the_unit_checks_would_catch_a_broken_unit(tmp_path):
    """verify reports an unknown key and a bad restart policy on stderr (its exit status stays 0)."""
    unit = UNITS[0].read_text().replace("/opt/stemstream/.venv/bin/", f"{VENV_BIN}/")
    broken = tmp_path / "broken.service"
    broken.write_text(
        unit.replace("Restart=on-failure", "Restart=sometimes").replace("NoNewPriv", "NoNewPrivz")
    )
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True)
    assert "sometimes" in r.stderr and "NoNewPrivz" in r.stderr


def test_the_settings_check_refuses_a_misspelt_key_and_a_bad_value():
    from pydantic import ValidationError

    from flows.settings import Settings

    data = tomllib.loads('[streaming.curve]\nserver_secret_fle = "x"\n[sesion]\nnodes = 1\n')
    assert unknown_settings(data, Settings) == ["streaming.curve.server_secret_fle", "sesion"]
    with pytest.raises(ValidationError):
        Settings.model_validate(tomllib.loads('[slurm]\nqos = "real time"\n'))
