"""The live page against hostile clients (audit M4, M5, M9; L1, L6 beside it), with a real LiveServer on
loopback and real HTTP and WebSocket clients: a rebinding Host gets 400, a cross-site WebSocket is refused,
a bad, missing or non-ASCII token gets 401, the token never reaches the view's log, its command line or a
summary link, a client that never reads skips updates instead of queueing them, and the clients are
bounded in number. The webhook URL is a secret; a catalogue note with markup and ESC prints literally."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from stemstream_testing.catalogue_scans import write_scan
from stemstream_testing.cli import as_process, in_process
from stemstream_testing.support import free_port, wait_until
from streaming.protocol import live as live_wire
from streaming.settings import LiveSettings
from streaming.view.server import LiveServer
from streaming.view.token import TOKEN_FILE

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-token-value"


def _live(**extra: object) -> LiveSettings:
    return LiveSettings(bind=f"tcp://127.0.0.1:{free_port()}", page_port=0, **extra)


@pytest.fixture
def page():
    server = LiveServer(_live(max_clients=3)).start()
    yield server
    server.stop()


def _snapshot(key: str = "k1") -> list[bytes]:
    header = {
        "node": "a", "node_index": 0, "n_nodes": 1, "scan_number": 1, "scan_key": key, "width": 3,
        "height": 2, "expected_frames": 6, "seq": 0, "final": False, "frames": 3, "sectors": 12,
        "events": 9, "geometry": {"cx": 288.0, "cy": 288.0, "bf_radius": 100.0, "adf_inner": 120.0,
        "adf_outer": 250.0}, "dropped_batches": 0, "dropped_snapshots": 0, "counted_at": 1.0,
        "oldest_at": 1.0, "lo": 0, "hi": 6,
    }  # fmt: skip
    arrays = {k: np.full(6, 2, np.int64) for k in ("counts", "bf", "adf", "sum_col", "sum_row")}
    arrays["frames"] = np.ones(6, np.int32)
    arrays["pattern"] = np.full(576 * 576, 2, np.uint32)
    return [bytes(memoryview(p)) for p in live_wire.encode(live_wire.SNAP, header, arrays)]


def _scan_on(server: LiveServer, key: str = "k1") -> None:
    """A scan in the view, sent as a node sends it (its snapshot socket)."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as s:
        s.setsockopt(zmq.LINGER, 1000)
        s.connect(server.ingest.address)
        s.send_multipart(_snapshot(key))
        assert wait_until(lambda: server.state.scan(key) is not None, 10)


def test_a_rebinding_host_gets_400_and_loopback_names_are_served(page: LiveServer):
    base = f"http://127.0.0.1:{page.port}"
    assert httpx.get(f"{base}/api/state", headers={"Host": "rebind.attacker.example"}).status_code == 400
    assert httpx.get(f"{base}/", headers={"Host": f"attacker.example:{page.port}"}).status_code == 400
    for host in (f"127.0.0.1:{page.port}", f"localhost:{page.port}", f"[::1]:{page.port}", "LOCALHOST"):
        assert httpx.get(f"{base}/api/state", headers={"Host": host}).status_code == 200, host
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{page.port}/ws", additional_headers={"Host": "rebind.attacker.example"})
    assert refused.value.response.status_code == 400


def test_a_cross_site_websocket_is_refused(page: LiveServer):
    url = f"ws://127.0.0.1:{page.port}/ws"
    for origin in ("https://evil.example", f"http://evil.example:{page.port}", "null"):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, origin=origin, open_timeout=10)
        assert refused.value.response.status_code == 403, origin
    with connect(url, origin=f"http://127.0.0.1:{page.port}", open_timeout=10) as ws:  # the page's own
        assert "scans" in json.loads(ws.recv(timeout=10))


def test_the_token_bad_missing_or_non_ascii_is_401():
    server = LiveServer(_live(token_required=True, token=TOKEN)).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        for query in ("", "?token=", "?token=wrong", "?token=%C3%A9", "?token=%FF%FE", f"?token={TOKEN}x"):
            assert httpx.get(f"{base}/api/state{query}").status_code == 401, query
        bad_cookie = {"Cookie": "stemstream_live=\u00e9t\u00e9".encode()}
        assert httpx.get(f"{base}/api/state", headers=bad_cookie).status_code == 401
        ok = httpx.get(f"{base}/?token={TOKEN}")
        assert ok.status_code == 200 and ok.cookies.get("stemstream_live") == TOKEN
        assert httpx.get(f"{base}/api/state", cookies={"stemstream_live": TOKEN}).status_code == 200
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10)
        assert refused.value.response.status_code == 401
        with connect(f"ws://127.0.0.1:{server.port}/ws?token={TOKEN}", open_timeout=10) as ws:
            assert "scans" in json.loads(ws.recv(timeout=10))
        assert server.url.endswith(f"?token={TOKEN}") and TOKEN not in server.address
    finally:
        server.stop()


def test_a_session_hands_its_view_the_configured_token_and_no_log_or_link_holds_it(tmp_path, monkeypatch):
    """The session's own route: the settings file (no secrets), the token file the backend writes, the view
    command it runs. The view accepts the configured token; its log, its command line and links lack it."""
    from flows.settings import Settings, write_settings_file
    from tasks.acquisition.live import live_link, live_url
    from tasks.launch import backends
    from tasks.launch.plan import SessionPlan

    live = {"bind": f"tcp://127.0.0.1:{free_port()}", "page_port": 0, "token_required": True, "token": TOKEN}
    settings = Settings(streaming={"live": live})
    session_dir = tmp_path / "session"
    settings_file = write_settings_file(settings, session_dir / "settings.json")
    assert TOKEN not in settings_file.read_text()
    plan = SessionPlan(1, session_dir, tmp_path / "scans", settings_file, settings.streaming, "", "")
    started: dict[str, list[str]] = {}

    class Group:  # records what the backend starts; the view is then run as the session would
        def __init__(self, log_dir: Path) -> None:
            self.token = "group"

        def start(self, name: str, argv: list[str], **kw: object) -> None:
            started[name] = list(argv)

    monkeypatch.setattr(backends, "ProcessGroup", Group)
    backends.LocalAggregator().start(plan)
    token_file = session_dir / TOKEN_FILE
    assert token_file.read_text().strip() == TOKEN and (token_file.stat().st_mode & 0o777) == 0o600
    argv = started["view"]
    assert not any(TOKEN in a for a in argv)
    (session_dir / "logs").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMSTREAM_")}
    with open(session_dir / "logs" / "view.log", "wb") as log:
        view = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        assert wait_until(lambda: live_url(session_dir) is not None, 60), (
            session_dir / "logs/view.log"
        ).read_text()
        url = live_url(session_dir)
        assert "token" not in url and url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}api/state").status_code == 401
        assert httpx.get(f"{url}api/state?token={TOKEN}").status_code == 200
        assert live_url(session_dir, with_token=True) == f"{url}?token={TOKEN}"  # the user's terminal only
        assert TOKEN not in Path(f"/proc/{view.pid}/cmdline").read_bytes().decode(errors="replace")
        log_text = (session_dir / "logs" / "view.log").read_text()
        assert TOKEN not in log_text and f"token: in {token_file}" in log_text
        assert TOKEN not in live_link(live_url(session_dir, with_token=True), "/d/FOURD_1.h5")["live view"]
    finally:
        view.terminate()
        view.wait(20)


def test_a_random_token_goes_to_its_file_not_the_log(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEMSTREAM_")}
    env |= {
        "STEMSTREAM_STREAMING__LIVE__TOKEN_REQUIRED": "true",
        "STEMSTREAM_CONFIG": str(tmp_path / "none.toml"),
    }
    (tmp_path / "none.toml").write_text("")
    token_file, log_path = tmp_path / "tok", tmp_path / "view.log"
    argv = [sys.executable, "-m", "flows.cli", "view", "--port", "0", "--token-file", str(token_file)]
    argv += ["--bind", f"tcp://127.0.0.1:{free_port()}", "--timeout", "30"]
    with open(log_path, "wb") as log:
        view = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        assert wait_until(lambda: "live: " in log_path.read_text(), 60), log_path.read_text()
        token = token_file.read_text().strip()
        assert len(token) >= 16 and (token_file.stat().st_mode & 0o777) == 0o600
        assert token not in log_path.read_text()
        url = next(x for x in log_path.read_text().splitlines() if x.startswith("live: ")).split()[1]
        assert httpx.get(f"{url}api/state").status_code == 401
        assert httpx.get(f"{url}api/state?token={token}").status_code == 200
    finally:
        view.terminate()
        view.wait(20)


def _silent_websocket(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads (a zero receive window)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def test_a_client_that_never_reads_skips_updates_instead_of_queueing_them(page: LiveServer):
    _scan_on(page)
    silent = _silent_websocket(page.port)
    try:
        assert wait_until(lambda: len(page.clients.open) == 1, 10)
        stuck = page.clients.open[0]
        with connect(f"ws://127.0.0.1:{page.port}/ws", open_timeout=10) as reader:
            big = "x" * 400_000  # each state ~400 kB: 100 updates offer the silent client ~40 MB
            sent_at = {}
            for i in range(100):
                page.state.set_file("k1", f"/data/{big}{i}.h5")
                while not json.loads(reader.recv(timeout=10))["scans"][0]["file"].endswith(f"{i}.h5"):
                    pass
                sent_at[i] = stuck.sent
        # The server's buffer for it filled (kernel buffers + the transport's high-water mark), then every
        # further version was skipped: nothing queued in proportion to the updates.
        assert sent_at[99] == sent_at[60] < 60, sent_at  # (9 here: 4 MB of kernel buffer, 400 kB each)
        # One message in flight to it (its queue is at most 1), many versions behind: skipped, not queued.
        assert stuck.sending and page.state.version - stuck.seen >= 40, stuck
    finally:
        silent.close()
    assert wait_until(lambda: not page.clients.open, 10)


def test_websocket_clients_are_bounded_in_number(page: LiveServer):
    assert LiveSettings().max_clients == 16  # the default; this page allows 3
    url = f"ws://127.0.0.1:{page.port}/ws"
    open_ = [connect(url, open_timeout=10) for _ in range(3)]
    try:
        for ws in open_:
            ws.recv(timeout=10)
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=10)
        assert refused.value.response.status_code == 403 and page.clients.refused == 1
        open_.pop().close()
        assert wait_until(lambda: len(page.clients.open) == 2, 10)
        with connect(url, open_timeout=10) as again:
            assert "scans" in json.loads(again.recv(timeout=10))
    finally:
        for ws in open_:
            ws.close()


def test_the_json_image_endpoint_is_capped(page: LiveServer, monkeypatch):
    from streaming.view import app

    _scan_on(page)
    base = f"http://127.0.0.1:{page.port}/api/scans/k1"
    assert httpx.get(f"{base}/bf.json").json()["shape"] == [2, 3]
    monkeypatch.setattr(app, "MAX_JSON_VALUES", 5)  # a 3x2 scan is then "too large"
    assert httpx.get(f"{base}/bf.json").status_code == 413
    assert httpx.get(f"{base}/bf.png").status_code == 200


def test_the_webhook_url_is_a_secret():
    from flows.settings import Settings, settings_json

    hook = "https://hooks.slack.com/services/T/B/SECRET"
    settings = Settings(session={"alert_webhook": hook})
    assert "SECRET" not in settings_json(settings) and "SECRET" not in repr(settings)
    assert settings.session.alert_webhook.get_secret_value() == hook


def test_catalogue_markup_and_escapes_print_literally(tmp_path: Path):
    record = write_scan(tmp_path / "data", 1, 1)
    config = tmp_path / "stemstream.toml"
    config.write_text("# empty\n")
    env = {"STEMSTREAM_CONFIG": str(config), "STEMSTREAM_OUTPUT_DIR": str(tmp_path / "out"), "COLUMNS": "250"}
    assert in_process(["scans", "rebuild", str(tmp_path / "data")], env).returncode == 0
    note = "[/] \x1b[31mred\x1b[0m [bold]b[/bold] \x07"
    assert in_process(["scans", "note", record.scan_uuid, note], env).returncode == 0
    for args in (["scans", "show", record.scan_uuid], ["scans"]):  # real processes: the real terminal width
        r = as_process(args, env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout
        assert "[/]" in r.stdout, r.stdout
    shown = as_process(["scans", "show", record.scan_uuid], env).stdout
    assert "[/] [31mred[0m [bold]b[/bold]" in shown


@settings(max_examples=300, deadline=None)
@given(
    host=st.sampled_from([b"127.0.0.1:17080", b"localhost", b"[::1]:1"]) | st.binary(max_size=40),
    origin=st.none() | st.just(b"http://127.0.0.1:17080") | st.binary(max_size=40),
    query=st.sampled_from([b"token=" + TOKEN.encode(), b"token=%C3%A9", b"token=%FF"])
    | st.binary(max_size=60),
    cookie=st.none() | st.binary(max_size=60),
    kind=st.sampled_from(["http", "websocket"]),
)
def test_the_guard_answers_any_request_with_a_status_never_an_error(host, origin, query, cookie, kind):
    """Arbitrary Host, Origin, query and cookie bytes: the guard lets the request through or refuses it
    with 400, 401 or 403; nothing raises (a non-ASCII token was a 500)."""
    import asyncio

    from streaming.view.guard import PageGuard, page_hosts

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    headers = [(b"host", host)] + [(b"origin", origin)] * (origin is not None)
    headers += [(b"cookie", cookie)] * (cookie is not None)
    scope = {
        "type": kind,
        "headers": headers,
        "query_string": query,
        "extensions": {"websocket.http.response": {}},
    }
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    guard = PageGuard(app, TOKEN, page_hosts("127.0.0.1", exposed=False))
    asyncio.run(guard(scope, None, send))
    assert sent[0]["status"] in (200, 400, 401, 403)
    assert sent[0]["status"] != 200 or TOKEN.encode() in query + (cookie or b"")
