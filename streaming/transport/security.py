"""CurveZMQ for the aggregator's node and monitor sockets: key pairs, key files and socket set-up.

Keys are z85 strings (40 characters). Key files use ZeroMQ's certificate format (``zmq.auth``):
``<name>.key`` holds the public key, ``<name>.key_secret`` both keys and is written with mode 0600.
Servers accept only the client public keys they are given (a ZAP allow-list), never any key.
Secret keys are held as ``pydantic.SecretStr`` so they never show in reprs, logs or error messages.
Without a config the sockets stay plain (NULL mechanism), which is for localhost only.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from pydantic import SecretStr
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from counting.errors import PermanentError
from streaming.transport.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

KEY_CHARS = 40  # z85 of a 32-byte Curve25519 key
_SECRET_SUFFIX = ".key_secret"
_PUBLIC_SUFFIX = ".key"


class SecurityError(PermanentError, ValueError):
    """A key or key file is unusable; the message never contains secret material."""


def generate_keypair() -> tuple[str, str]:
    """A new Curve25519 key pair as z85 strings (public, secret)."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def public_from_secret(secret: str | SecretStr) -> str:
    """The public key that belongs to a secret key (z85)."""
    return zmq.curve_public(_reveal(secret).encode("ascii")).decode("ascii")


def write_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Create a key pair as ``<name>.key`` and ``<name>.key_secret`` (mode 0600) in directory.

    The files are created in a private (0700) scratch directory first and moved into place, so the
    secret file is never readable by others, not even briefly. Returns (public path, secret path).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".keys-", dir=out))  # mkdtemp makes it 0700
    try:
        public_tmp, secret_tmp = zmq.auth.create_certificates(scratch, name)
        os.chmod(secret_tmp, 0o600)
        os.chmod(public_tmp, 0o644)
        public_path, secret_path = out / f"{name}{_PUBLIC_SUFFIX}", out / f"{name}{_SECRET_SUFFIX}"
        os.replace(secret_tmp, secret_path)
        os.replace(public_tmp, public_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public_path, secret_path


def load_keypair(path: str | os.PathLike[str]) -> tuple[str, SecretStr | None]:
    """Read a key file: (public, secret) from a ``.key_secret`` file, (public, None) from a ``.key`` file.

    A secret file readable by group or others is refused, as ssh refuses such private keys.
    """
    p = Path(path)
    if not p.is_file():
        raise SecurityError(f"{p}: no such key file")
    if p.name.endswith(_SECRET_SUFFIX) and stat.S_IMODE(p.stat().st_mode) & 0o077:
        raise SecurityError(f"{p}: secret key file must not be readable by group or others (chmod 600)")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except Exception as exc:
        raise SecurityError(f"{p}: not a ZeroMQ key file ({type(exc).__name__})") from None
    if public is None:
        raise SecurityError(f"{p}: key file has no public key")
    public_z85 = _check_key(public.decode("ascii"), "public key")
    if secret is None:
        return public_z85, None
    return public_z85, SecretStr(_check_key(secret.decode("ascii"), "secret key"))


def load_public_keys(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Public keys of the given key files (``.key`` or ``.key_secret``), e.g. a server's allow-list."""
    return [load_keypair(p)[0] for p in paths]


@dataclass(frozen=True)
class CurveServerConfig:
    """A CURVE server: its key pair and the client public keys it accepts (nothing else)."""

    secret_key: SecretStr
    public_key: str
    allowed_clients: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "secret_key", SecretStr(_check_key(_reveal(self.secret_key), "secret key")))
        object.__setattr__(self, "public_key", _check_key(self.public_key, "public key"))
        clients = tuple(_check_key(k, "allowed client key") for k in self.allowed_clients)
        if not clients:
            raise SecurityError("a CURVE server needs at least one allowed client public key")
        object.__setattr__(self, "allowed_clients", clients)
        if public_from_secret(self.secret_key) != self.public_key:
            raise SecurityError("server public key does not belong to the server secret key")

    @classmethod
    def from_files(
        cls, secret_file: str | os.PathLike[str], client_key_files: Iterable[str | os.PathLike[str]]
    ) -> CurveServerConfig:
        """Server keys from its ``.key_secret`` file, allow-list from the clients' public key files."""
        public, secret = load_keypair(secret_file)
        if secret is None:
            raise SecurityError(f"{secret_file}: has no secret key")
        return cls(secret, public, tuple(load_public_keys(client_key_files)))


@dataclass(frozen=True)
class CurveClientConfig:
    """A CURVE client: its key pair and the server's public key."""

    public_key: str
    secret_key: SecretStr
    server_public: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "secret_key", SecretStr(_check_key(_reveal(self.secret_key), "secret key")))
        object.__setattr__(self, "public_key", _check_key(self.public_key, "public key"))
        object.__setattr__(self, "server_public", _check_key(self.server_public, "server public key"))
        if public_from_secret(self.secret_key) != self.public_key:
            raise SecurityError("client public key does not belong to the client secret key")

    @classmethod
    def from_files(
        cls, secret_file: str | os.PathLike[str], server_key_file: str | os.PathLike[str]
    ) -> CurveClientConfig:
        """Client keys from its ``.key_secret`` file, the server's public key from its key file."""
        public, secret = load_keypair(secret_file)
        if secret is None:
            raise SecurityError(f"{secret_file}: has no secret key")
        return cls(public, secret, load_keypair(server_key_file)[0])


def peer_curve(node: CurveClientConfig) -> tuple[CurveServerConfig, CurveClientConfig]:
    """CURVE between the nodes and the scan writer node 0 hosts, from the nodes' own key pair (the session's
    nodes share one, ``streaming.curve.client_secret_file``): the writer serves with it and accepts only it;
    each node connects with it as client and server key."""
    server = CurveServerConfig(node.secret_key, node.public_key, (node.public_key,))
    return server, CurveClientConfig(node.public_key, node.secret_key, node.public_key)


class _AllowList:
    """ZAP credentials provider: accept exactly the listed client public keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = frozenset(k.encode("ascii") for k in keys)
        self._refused = RateLimitedLog(log)  # one line per power of two: a reconnect loop cannot flood

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator with the client's z85 public key."""
        allowed = key in self._keys
        if not allowed:
            self._refused(
                "refused a CURVE client with an unknown public key", "%s", key.decode("ascii", "replace")
            )
        return allowed


def start_authenticator(ctx: zmq.Context, cfg: CurveServerConfig) -> ThreadAuthenticator:
    """Start the context's ZAP handler allowing only cfg's client keys; the caller stops it."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(cfg.allowed_clients))
    return auth


def apply_server(
    socket: zmq.Socket, cfg: CurveServerConfig, ctx: zmq.Context, auth: ThreadAuthenticator | None = None
) -> ThreadAuthenticator:
    """Make socket a CURVE server (before bind); starts the ZAP handler unless one is passed in.

    ZeroMQ allows one ZAP handler per context: pass the returned authenticator for further sockets of
    the same context, and stop it when the context is done.
    """
    if auth is None:
        auth = start_authenticator(ctx, cfg)
    socket.curve_secretkey = _reveal(cfg.secret_key).encode("ascii")
    socket.curve_publickey = cfg.public_key.encode("ascii")
    socket.curve_server = True
    return auth


def apply_client(socket: zmq.Socket, cfg: CurveClientConfig) -> None:
    """Make socket a CURVE client of the server whose public key cfg holds (before connect)."""
    socket.curve_secretkey = _reveal(cfg.secret_key).encode("ascii")
    socket.curve_publickey = cfg.public_key.encode("ascii")
    socket.curve_serverkey = cfg.server_public.encode("ascii")


def _reveal(secret: str | SecretStr) -> str:
    return secret.get_secret_value() if isinstance(secret, SecretStr) else str(secret)


def _check_key(key: object, what: str) -> str:
    """A z85 key of 40 characters that decodes to 32 bytes; the message never shows the key."""
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not isinstance(key, str) or len(key) != KEY_CHARS:
        raise SecurityError(f"{what} must be a {KEY_CHARS}-character z85 string")
    try:
        raw = z85.decode(key)
    except Exception:
        raise SecurityError(f"{what} is not valid z85") from None
    if len(raw) != 32:
        raise SecurityError(f"{what} does not decode to 32 bytes")
    return key
