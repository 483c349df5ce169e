"""CurveZMQ: keys and key files, secrets never shown, only allowed clients get through (socket level).

The aggregator end to end in secure mode is in test_aggregator.py (test_curve_aggregator)."""

from __future__ import annotations

import os
import stat
import time

import pytest
import zmq

from streaming.transport.security import (
    CurveClientConfig,
    CurveServerConfig,
    SecurityError,
    apply_client,
    apply_server,
    generate_keypair,
    load_keypair,
    public_from_secret,
    write_keypair,
)

pytestmark = pytest.mark.timeout(60)


def test_keypair() -> None:
    public, secret = generate_keypair()
    assert len(public) == 40 and len(secret) == 40 and public != secret
    assert public_from_secret(secret) == public


def test_key_files_round_trip_and_secret_mode(tmp_path) -> None:
    public_path, secret_path = write_keypair(tmp_path / "keys", "aggregator")
    assert public_path.name == "aggregator.key" and secret_path.name == "aggregator.key_secret"
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert sorted(x.name for x in (tmp_path / "keys").iterdir()) == [
        "aggregator.key",
        "aggregator.key_secret",
    ]
    public, secret = load_keypair(secret_path)
    assert secret is not None and public_from_secret(secret) == public
    assert load_keypair(public_path) == (public, None)
    os.chmod(secret_path, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_keypair(secret_path)
    with pytest.raises(SecurityError, match="no such"):
        load_keypair(tmp_path / "missing.key")


def test_configs_from_files(tmp_path) -> None:
    _, server_secret = write_keypair(tmp_path, "server")
    client_public, client_secret = write_keypair(tmp_path, "node0")
    server = CurveServerConfig.from_files(server_secret, [client_public])
    client = CurveClientConfig.from_files(client_secret, tmp_path / "server.key")
    assert server.allowed_clients == (client.public_key,)
    assert client.server_public == server.public_key


def test_secrets_never_shown() -> None:
    server_public, server_secret = generate_keypair()
    client_public, client_secret = generate_keypair()
    server = CurveServerConfig(server_secret, server_public, [client_public])
    client = CurveClientConfig(client_public, client_secret, server_public)
    for text in (repr(server), str(server), repr(client), str(client)):
        assert server_secret not in text and client_secret not in text
    _, other_secret = generate_keypair()
    for make in (
        lambda: CurveServerConfig(server_secret[:-1], server_public, [client_public]),
        lambda: CurveServerConfig(other_secret, server_public, [client_public]),
        lambda: CurveClientConfig(client_public, server_secret, server_public),
        lambda: CurveServerConfig(server_secret, server_public, []),
    ):
        with pytest.raises(SecurityError) as info:
            make()
        for secret in (server_secret[:-1], client_secret, other_secret):
            assert secret not in str(info.value)


def test_plain_sockets_need_no_config() -> None:
    """Without a config nothing is applied: plain NULL mechanism for localhost."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUB)
        assert sock.mechanism == zmq.NULL
        sock.close(linger=0)
    finally:
        ctx.term()


def test_only_the_allowed_key_reaches_the_server() -> None:
    """Socket-level: allowed client talks; unknown key and plaintext clients are refused."""
    server_public, server_secret = generate_keypair()
    good_public, good_secret = generate_keypair()
    bad_public, bad_secret = generate_keypair()
    cfg = CurveServerConfig(server_secret, server_public, [good_public])
    ctx = zmq.Context()
    auth = None
    socks = []
    try:
        server = ctx.socket(zmq.ROUTER)
        socks.append(server)
        auth = apply_server(server, cfg, ctx)
        server.bind("tcp://127.0.0.1:0")
        endpoint = server.LAST_ENDPOINT.decode()
        clients = {}
        for name, client_cfg in (
            ("good", CurveClientConfig(good_public, good_secret, server_public)),
            ("bad", CurveClientConfig(bad_public, bad_secret, server_public)),
            ("plain", None),
        ):
            dealer = ctx.socket(zmq.DEALER)
            socks.append(dealer)
            if client_cfg is not None:
                apply_client(dealer, client_cfg)
            dealer.connect(endpoint)
            dealer.send(name.encode())
            clients[name] = dealer
        got = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if server.poll(50):
                got.add(server.recv_multipart()[1])
        assert got == {b"good"}
    finally:
        for sock in socks:
            sock.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()
