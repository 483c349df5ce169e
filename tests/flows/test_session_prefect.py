"""The embedded Prefect server's template database (flows/session_prefect.py): a new PREFECT_HOME gets a copy
of a migrated database, a template is a consistent copy of a live one, nothing is ever written over."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from flows.session_prefect import DB, MEMO, early_server, keep_template, seed_database, template_dir


def _database(path: Path, rows: int) -> None:
    """A WAL-mode SQLite database with `rows` rows, left open by no one (as Prefect's server leaves it)."""
    con = sqlite3.connect(path)
    con.execute("pragma journal_mode=wal")
    con.execute("create table t (x integer)")
    con.executemany("insert into t values (?)", [(i,) for i in range(rows)])
    con.commit()
    con.close()


def _rows(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("select count(*) from t").fetchone()[0]
    finally:
        con.close()


def test_template_is_kept_once_then_seeds_new_homes_only(tmp_path: Path) -> None:
    first, template = tmp_path / "first", template_dir("9.9.9", tmp_path / "cache")
    first.mkdir()
    _database(first / DB, 100)
    (first / MEMO).write_text('block_auto_registration = "abc"\n')
    live = sqlite3.connect(first / DB)  # the server holds it open: the copy is SQLite's backup
    try:
        assert keep_template(first, template)
        _database(tmp_path / "other.db", 5)
        assert not keep_template(tmp_path, template)  # there is one: never replaced
    finally:
        live.close()
    assert template == tmp_path / "cache" / "stemstream" / "prefect-9.9.9"
    assert _rows(template / DB) == 100 and (template / MEMO).read_text() == (first / MEMO).read_text()
    assert not [p for p in template.iterdir() if p.name.endswith(".tmp")]

    new = tmp_path / "new"
    new.mkdir()
    assert seed_database(new, template)
    assert _rows(new / DB) == 100 and (new / MEMO).is_file()
    used = tmp_path / "used"
    used.mkdir()
    _database(used / DB, 7)
    assert not seed_database(used, template)  # a home with a database keeps it
    assert _rows(used / DB) == 7
    assert not seed_database(tmp_path / "none", tmp_path / "no-template")


def test_no_early_server_where_prefect_is_configured_or_already_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert early_server(chose_home=True) is None
    monkeypatch.delenv("PREFECT_API_URL")
    import prefect  # noqa: F401  (in-process callers such as tests have it loaded, with their own settings)

    assert early_server(chose_home=True) is None  # this process has imported Prefect: its own path runs
    assert not (tmp_path / DB).exists()
