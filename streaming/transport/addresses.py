"""ZeroMQ address surgery, in one place: another port on the same host, a port offset per data path, and
a wildcard bind as others reach it."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_TCP = re.compile(r"(tcp://.+):(\d+)")
_WILDCARDS = {"*", "0.0.0.0", "::", "[::]"}


def offset_address(address: str, delta: int) -> str:
    """tcp://host:port -> tcp://host:port+delta (port 0 stays 0: any free port); other transports: a
    suffix, so ipc paths stay distinct."""
    m = _TCP.fullmatch(address)
    if m is None:
        return address if delta == 0 else f"{address}-{delta}"
    port = int(m.group(2))
    return address if port == 0 else f"{m.group(1)}:{port + delta}"


def with_port(address: str, port: int) -> str:
    """The same tcp host with another port; ValueError for any other transport."""
    m = _TCP.fullmatch(address)
    if m is None:
        raise ValueError(f"forwarding processes need a tcp:// aggregator address, got {address!r}")
    return f"{m.group(1)}:{port}"


def announced(endpoint: str, host: str) -> str:
    """A bound endpoint as others connect to it: a wildcard host (tcp://0.0.0.0:PORT) becomes ``host``."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.hostname is None:
        return endpoint
    bound = parts.netloc.rsplit(":", 1)[0]
    return f"tcp://{host}:{parts.port}" if bound in _WILDCARDS else endpoint


def port_of(endpoint: str) -> int:
    """The port of a tcp endpoint."""
    return int(endpoint.rsplit(":", 1)[1])
