"""run_remote / start_remote_process / stop_remote_process against a real OpenSSH sshd on loopback."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

import pytest
from pydantic import SecretStr

from tasks.settings import SshSettings
from tasks.ssh import (
    AuthenticationFailed,
    HostKeyRejected,
    RemoteCommandFailed,
    RemoteTimeout,
    RemoteUnreachable,
    run_remote,
    start_remote_process,
    stop_remote_process,
)

from .helpers import alive, free_port, keygen, wait_until


def test_command_output_and_exit_status(sshd: SshSettings) -> None:
    result = run_remote(sshd, "echo armed; echo warn >&2")
    assert (result.exit_status, result.stdout, result.stderr) == (0, "armed\n", "warn\n")


def test_list_command_is_quoted(sshd: SshSettings, tmp_path: Path) -> None:
    result = run_remote(sshd, ["printf", "%s|", "a b", "$HOME", "it's"])
    assert result.stdout == "a b|$HOME|it's|"


def test_stdin_reaches_the_command_then_eof(sshd: SshSettings) -> None:
    assert run_remote(sshd, "cat; echo end", stdin="a secret\n").stdout == "a secret\nend\n"
    assert run_remote(sshd, "cat; echo end").stdout == "end\n"  # no stdin: EOF at once, no hang


def test_megabytes_on_both_streams_do_not_deadlock(sshd: SshSettings) -> None:
    # Both streams at once: a reader that drained only stdout would leave the remote side blocked on stderr.
    result = run_remote(
        sshd, "head -c 3000000 /dev/zero | tr '\\0' e >&2; head -c 1048576 /dev/zero | tr '\\0' o"
    )
    assert len(result.stdout) == 1_048_576 and len(result.stderr) == 3_000_000


def test_non_zero_exit_raises_with_the_stderr_tail(sshd: SshSettings) -> None:
    with pytest.raises(RemoteCommandFailed, match="exited 3: bad thing") as info:
        run_remote(sshd, "echo noise; echo bad thing >&2; exit 3")
    assert info.value.exit_status == 3 and info.value.stderr_tail.strip() == "bad thing"


def test_non_zero_exit_without_check(sshd: SshSettings) -> None:
    assert run_remote(sshd, "exit 4", check=False).exit_status == 4


def test_long_stderr_is_cut_to_its_tail(sshd: SshSettings) -> None:
    with pytest.raises(RemoteCommandFailed) as info:
        run_remote(sshd, "seq 1 5000 >&2; exit 1")
    assert info.value.stderr_tail.endswith("5000\n") and len(info.value.stderr_tail) <= 2000


def test_timeout(sshd: SshSettings) -> None:
    t = time.monotonic()
    with pytest.raises(RemoteTimeout, match="exceeded 0.5 s"):
        run_remote(sshd, "sleep 5", timeout=0.5)
    assert time.monotonic() - t < 3


def test_unknown_host_is_rejected(sshd: SshSettings, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyRejected, match="not in known_hosts"):
        run_remote(sshd.model_copy(update={"known_hosts": empty}), "true")


def test_changed_host_key_is_rejected(sshd: SshSettings, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key")
    kind, b64 = Path(f"{other}.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd.host}]:{sshd.port} {kind} {b64}\n")
    with pytest.raises(HostKeyRejected, match="CHANGED"):
        run_remote(sshd.model_copy(update={"known_hosts": known}), "true")


def test_missing_known_hosts_is_rejected(sshd: SshSettings, tmp_path: Path) -> None:
    with pytest.raises(HostKeyRejected, match="does not exist"):
        run_remote(sshd.model_copy(update={"known_hosts": tmp_path / "nope"}), "true")


def test_malformed_known_hosts_is_rejected(sshd: SshSettings, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd.host}]:{sshd.port} ssh-ed25519 !!!not-base64\n")
    with pytest.raises(HostKeyRejected, match="cannot read known_hosts file"):
        run_remote(sshd.model_copy(update={"known_hosts": known}), "true")


def test_a_session_lost_mid_command_is_unreachable_at_once(sshd: SshSettings) -> None:
    t = time.monotonic()
    with pytest.raises(RemoteUnreachable, match="lost during"):  # transient: a retry may get through
        run_remote(sshd, "kill -9 $PPID; sleep 5", timeout=10)  # $PPID: this session's sshd process
    assert time.monotonic() - t < 5


def test_wrong_user_key_is_refused(sshd: SshSettings, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(AuthenticationFailed, match="refused the key"):
        run_remote(sshd.model_copy(update={"key_path": stranger}), "true")


def test_encrypted_key_needs_its_passphrase_which_never_shows(
    sshd: SshSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    passphrase = "correct horse battery staple"
    locked = keygen(tmp_path / "locked", passphrase=passphrase)
    settings = sshd.model_copy(update={"key_path": locked})
    with pytest.raises(AuthenticationFailed, match="set key_passphrase"):
        run_remote(settings, "true")
    with pytest.raises(AuthenticationFailed, match="wrong passphrase") as info:
        run_remote(settings.model_copy(update={"key_passphrase": SecretStr("wrong " + passphrase)}), "true")
    key_text = locked.read_text().splitlines()[1]
    shown = "".join(traceback.format_exception(info.value)) + caplog.text + repr(settings)
    assert passphrase not in shown and key_text not in shown

    # ...and with the right passphrase it logs in (the server authorises this key for the moment).
    authorized = sshd.key_path.parent / "authorized_keys"
    before = authorized.read_text()
    authorized.write_text(before + (tmp_path / "locked.pub").read_text())
    try:
        result = run_remote(settings.model_copy(update={"key_passphrase": SecretStr(passphrase)}), "echo in")
    finally:
        authorized.write_text(before)
    assert result.stdout.strip() == "in"
    assert passphrase not in caplog.text


def test_missing_user_key(sshd: SshSettings, tmp_path: Path) -> None:
    with pytest.raises(AuthenticationFailed, match="cannot read SSH key"):
        run_remote(sshd.model_copy(update={"key_path": tmp_path / "nope"}), "true")


def test_unreachable_host(sshd: SshSettings) -> None:
    t = time.monotonic()
    with pytest.raises(RemoteUnreachable, match="cannot open an SSH session"):
        run_remote(sshd.model_copy(update={"port": free_port()}), "true")
    assert time.monotonic() - t < 3


def test_start_and_stop_a_remote_process(sshd: SshSettings, tmp_path: Path) -> None:
    log_path = tmp_path / "aggregator.log"
    code = "import os, subprocess, time; subprocess.Popen(['sleep', '60']); print('ready', flush=True); time.sleep(60)"
    pid = start_remote_process(sshd, [sys.executable, "-c", code], str(log_path))
    try:
        assert alive(pid)
        assert wait_until(lambda: log_path.exists() and "ready" in log_path.read_text())
        child = _children(pid)
        assert child and all(alive(c) for c in child)
        assert stop_remote_process(sshd, pid, grace=2) == "terminated"
        assert not alive(pid) and not any(alive(c) for c in child)  # the whole session was stopped
        assert stop_remote_process(sshd, pid) == "not-running"  # idempotent
    finally:
        if alive(pid):
            stop_remote_process(sshd, pid, grace=0.5)


def test_stop_kills_a_process_that_ignores_sigterm(sshd: SshSettings, tmp_path: Path) -> None:
    pid = start_remote_process(sshd, "sh -c 'trap \"\" TERM; sleep 60'", str(tmp_path / "stubborn.log"))
    try:
        t = time.monotonic()
        assert stop_remote_process(sshd, pid, grace=0.5) == "killed"
        assert time.monotonic() - t < 5 and not alive(pid)
    finally:
        if alive(pid):
            stop_remote_process(sshd, pid, grace=0.5)


def test_a_process_that_dies_at_once_is_reported(sshd: SshSettings, tmp_path: Path) -> None:
    with pytest.raises(RemoteCommandFailed, match="no such aggregator config"):
        start_remote_process(
            sshd, "sh -c 'echo no such aggregator config >&2; exit 2'", str(tmp_path / "dead.log")
        )


def test_refuses_to_signal_pid_1(sshd: SshSettings) -> None:
    with pytest.raises(ValueError, match="refusing"):
        stop_remote_process(sshd, 1)


def test_settings_expand_home_and_hide_the_passphrase() -> None:
    s = SshSettings(key_passphrase=SecretStr("hunter2"))
    assert "~" not in str(s.key_path) and "~" not in str(s.known_hosts)
    assert "hunter2" not in repr(s) + s.model_dump_json()


def _children(pid: int) -> list[int]:
    """PIDs whose parent is pid (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
