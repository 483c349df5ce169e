"""ZeroMQ plumbing shared by every process: CURVE security, the routed send and drain, addresses.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "announced": "streaming.transport.addresses",
    "offset_address": "streaming.transport.addresses",
    "port_of": "streaming.transport.addresses",
    "with_port": "streaming.transport.addresses",
    "Sent": "streaming.transport.router_io",
    "drain": "streaming.transport.router_io",
    "send_waiting": "streaming.transport.router_io",
    "CurveClientConfig": "streaming.transport.security",
    "CurveServerConfig": "streaming.transport.security",
    "apply_client": "streaming.transport.security",
    "apply_server": "streaming.transport.security",
    "generate_keypair": "streaming.transport.security",
    "load_keypair": "streaming.transport.security",
    "write_keypair": "streaming.transport.security",
}
__all__ = [
    "announced",
    "apply_client",
    "apply_server",
    "CurveClientConfig",
    "CurveServerConfig",
    "drain",
    "generate_keypair",
    "load_keypair",
    "offset_address",
    "port_of",
    "send_waiting",
    "Sent",
    "with_port",
    "write_keypair",
]

if TYPE_CHECKING:
    from streaming.transport.addresses import announced, offset_address, port_of, with_port
    from streaming.transport.router_io import Sent, drain, send_waiting
    from streaming.transport.security import (
        CurveClientConfig,
        CurveServerConfig,
        apply_client,
        apply_server,
        generate_keypair,
        load_keypair,
        write_keypair,
    )


__getattr__ = lazy_exports(__name__, _WHERE)
