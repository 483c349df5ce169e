"""`stemstream keys`: the key pairs are written in the format the streaming.curve settings read, private,
never over an existing file; `keys show` prints public keys and never a secret (in process, fast)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from stemstream_testing.cli import in_process
from streaming.components import client_curve, server_curve
from streaming.settings import CurveSettings
from streaming.transport.security import load_keypair

NAMES = ["aggregator.key", "aggregator.key_secret", "nodes.key", "nodes.key_secret"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_both_pairs_private_in_the_settings_format(tmp_path):
    out = tmp_path / "new" / "keys"
    r = in_process(["keys", "generate", "--out", str(out)], {"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == NAMES  # no scratch directory left behind
    assert _mode(out) == 0o700 and all(_mode(out / n) == 0o600 for n in NAMES)
    for name, setting in [
        ("aggregator.key_secret", "streaming.curve.server_secret_file"),
        ("aggregator.key", "streaming.curve.server_public_file"),
        ("nodes.key_secret", "streaming.curve.client_secret_file"),
        ("nodes.key", "streaming.curve.allowed_clients"),
    ]:
        assert f"{out / name}  ->  {setting}" in r.stdout
    curve = CurveSettings(
        server_secret_file=out / "aggregator.key_secret",
        allowed_clients=[out / "nodes.key"],
        client_secret_file=out / "nodes.key_secret",
        server_public_file=out / "aggregator.key",
    )
    server, client = server_curve(curve), client_curve(curve)
    assert server is not None and client is not None
    assert client.public_key in server.allowed_clients and client.server_public == server.public_key


def test_generate_never_replaces_a_file_and_writes_nothing_then(tmp_path):
    (tmp_path / "nodes.key").write_text("someone's key\n")
    r = in_process(["keys", "generate", "--out", str(tmp_path)], {})
    assert r.returncode == 1
    assert "nodes.key" in r.stderr and "never overwritten" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodes.key"]
    assert (tmp_path / "nodes.key").read_text() == "someone's key\n"


def test_a_file_that_appears_meanwhile_is_kept_and_ours_are_removed(tmp_path, monkeypatch):
    """A key file made by someone else between the check and the naming: the no-replace naming refuses,
    the files this run named are removed, the other one is untouched."""
    import flows.cli.keys as cli_keys

    class Racing(cli_keys.FinalName):
        def publish(self, src: Path, dst: Path) -> bool:
            if dst.name == "nodes.key_secret":
                dst.write_text("theirs\n")
            return super().publish(src, dst)

    monkeypatch.setattr(cli_keys, "FinalName", Racing)
    r = in_process(["keys", "generate", "--out", str(tmp_path / "k")], {})
    assert r.returncode == 1 and "nodes.key_secret" in r.stderr
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["nodes.key_secret"]
    assert (tmp_path / "k" / "nodes.key_secret").read_text() == "theirs\n"


def test_show_prints_public_keys_only(tmp_path):
    assert in_process(["keys", "generate", "--out", str(tmp_path)], {}).returncode == 0
    r = in_process(["keys", "show", str(tmp_path)], {"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    for name in ("aggregator", "nodes"):
        public, secret = load_keypair(tmp_path / f"{name}.key_secret")
        assert secret is not None
        assert f"{name}.key: public {public}" in r.stdout
        assert f"{name}.key_secret: key pair, public {public}" in r.stdout
        assert secret.get_secret_value() not in r.stdout + r.stderr


def test_show_prints_a_key_with_brackets_as_it_is(tmp_path):
    """z85 keys may hold "[...]" (rich markup to a console that reads it): printed verbatim."""
    public = "[bold]" + "x" * 28 + "[/b]AB"
    (tmp_path / "camera.key").write_text(f'metadata\ncurve\n    public-key = "{public}"\n')
    assert load_keypair(tmp_path / "camera.key")[0] == public
    r = in_process(["keys", "show", str(tmp_path)], {"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert f"camera.key: public {public}" in r.stdout


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda d: (d / "nodes.key_secret").chmod(0o640), "chmod 600"),
        (lambda d: [p.unlink() for p in d.iterdir()], "no .key or .key_secret files"),
        (lambda d: (d / "aggregator.key").write_text("not a key\n"), "aggregator.key"),
    ],
    ids=["readable-secret", "empty-dir", "not-a-key"],
)
def test_show_refuses_with_one_line(tmp_path, prepare, message):
    assert in_process(["keys", "generate", "--out", str(tmp_path)], {}).returncode == 0
    prepare(tmp_path)
    r = in_process(["keys", "show", str(tmp_path)], {"COLUMNS": "200"})
    assert r.returncode == 1 and message in r.stderr and r.stderr.startswith("error:"), r.stderr
