"""The aberration message: after each phase fit of a scan (during it and the final one) the view publishes
the fitted defocus, astigmatism and rotation as ``tap.aberration`` on a PUB socket of its own
(``tcp://<live.aberration_host>:<live.aberration_port>``, with ``live.aberration``), for a program at the
microscope to act on (correcting the lenses before the next scan is that program's job;
examples/aberration_client.py is one).

Wire: ``[b"tap.aberration", msgpack header]`` (streaming.protocol.live.encode, as the counted-data tap), the
header's fields in ``HEADER_FIELDS``; fitted values are nil when the fit failed (``status`` "failed",
``error`` says why). A scan whose file gets the microscope's metadata after its final fit is fitted again
in nm: a second final message then follows, calibrated.

Never blocking the fit: the fit's thread only queues the message (streaming.transport.topic_pub). Security
as the tap's (README L4): plain on loopback unless ``live.tap_curve``; off loopback only over CURVE, the
view's key pair (the aggregator's, ``streaming.curve``) accepting ``live.tap_clients``, and without keys no
socket (one error line; the view goes on).
"""

from __future__ import annotations

import logging
import time

from streaming.protocol import live as live_wire
from streaming.settings import LiveSettings
from streaming.transport.security import CurveServerConfig, load_public_keys
from streaming.transport.topic_pub import TopicPublisher, is_loopback
from streaming.view.phase import FIT_FIELDS

log = logging.getLogger(__name__)
HWM = 64  # messages queued for the socket's thread (a fit is at most one a second per scan)
VALUES = FIT_FIELDS  # the fit's values and sigmas, as the page's phase record names them
HEADER_FIELDS = (
    "scan_number", "scan_key", "final", "status", "error", "fits", "positions", *VALUES, "units",
    "calibrated", "scan_step_nm", "mrad_per_px", "residual_px", "bins", "nodes", "seconds", "time", "seq",
)  # fmt: skip


def aberration_header(scan_number: int, scan_key: str, record: dict, seq: int) -> dict:
    """The message's header from a scan's phase record (streaming.view.phase.record): plain values."""
    ok = record.get("status") == "ok"
    out = {"scan_number": int(scan_number), "scan_key": scan_key, "seq": int(seq), "time": time.time()}
    for name in HEADER_FIELDS:
        if name not in out:
            out[name] = record.get(name)
    if not ok:  # a failed fit's record keeps the previous numbers for the page; the message has none
        out.update(dict.fromkeys(VALUES), positions=None)
    out["final"], out["calibrated"] = bool(record.get("final")), bool(record.get("calibrated"))
    return out


def encode_aberration(header: dict) -> list:
    """The message's parts."""
    return live_wire.encode(live_wire.TAP_ABERRATION, header)


def aberration_curve(live: LiveSettings, view: CurveServerConfig | None) -> CurveServerConfig | None:
    """The socket's CURVE server: the view's key pair, accepting its allowed clients and live.tap_clients."""
    if view is None:
        return None
    clients = (*view.allowed_clients, *load_public_keys(live.tap_clients))
    return CurveServerConfig(view.secret_key, view.public_key, clients)


class AberrationOut:
    """The view's aberration socket (or none, ``refused`` saying why); ``publish`` returns at once."""

    def __init__(self, live: LiveSettings, curve: CurveServerConfig | None = None) -> None:
        self.refused: str | None = None
        self.publisher: TopicPublisher | None = None
        self.seq = 0
        address = f"tcp://{live.aberration_host}:{live.aberration_port}"
        secure = live.tap_curve or not is_loopback(live.aberration_host)
        server = None
        if secure:
            try:
                server = aberration_curve(live, curve)
            except (OSError, ValueError) as exc:  # SecurityError is a ValueError; its text shows no key
                self.refused = f"the aberration socket's CURVE keys cannot be used ({exc})"
            else:
                if server is None:
                    self.refused = (
                        f"{address} needs CURVE (off loopback, or live.tap_curve) and the view has no keys "
                        "(streaming.curve)"
                    )
        if self.refused is None:
            try:
                self.publisher = TopicPublisher(
                    "stemstream-aberration", address, (live_wire.TAP_ABERRATION,), HWM, server
                )
            except OSError as exc:
                self.refused = str(exc)
        if self.refused is not None:
            log.error("no aberration messages: %s (the view goes on)", self.refused)
        else:
            log.info("aberration messages on %s%s", address, " (CURVE)" if server else "")

    @property
    def address(self) -> str | None:
        """The bound address (None: no socket)."""
        return self.publisher.address if self.publisher is not None else None

    def publish(self, scan_number: int, scan_key: str, record: dict) -> None:
        """Queue one fit's message (dropped and counted when the socket's queue is full)."""
        if self.publisher is None:
            return
        self.publisher.publish(encode_aberration(aberration_header(scan_number, scan_key, record, self.seq)))
        self.seq += 1

    def close(self) -> None:
        """Close the socket."""
        if self.publisher is not None:
            self.publisher.close()
