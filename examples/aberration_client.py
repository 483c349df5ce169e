"""Example client of stemstream's aberration messages: what a program at the microscope that corrects the
lenses between scans would subscribe to. It needs only pyzmq and msgpack (not stemstream).

The live view publishes, after each phase fit of a scan (during it and the final one), a two-part message
``[b"tap.aberration", msgpack header]`` on ``tcp://<live.aberration_host>:<live.aberration_port>``
(127.0.0.1:17090; on with ``live.aberration = true``; README "The counted-data tap" lists the fields).
Off loopback the socket is a CURVE server with the view's key pair (``streaming.curve``) accepting the keys
in ``live.tap_clients``: pass ``--server-key`` (the view's public .key) and ``--client-key`` (your
.key_secret, listed in live.tap_clients).

    python examples/aberration_client.py                          # every fit, until Ctrl-C
    python examples/aberration_client.py --once                   # wait for one scan's final fit, exit
    python examples/aberration_client.py --address tcp://host:17090 --server-key view.key \\
        --client-key lens.key_secret

A fit during the scan is provisional; act on ``final`` ones only. The values are in nm when ``calibrated``
(the session has the microscope's scan step and convergence angle), else in scan px per detector px: no
lens can be moved by those, so the example only reports them. A second final message for the same scan
may follow once the microscope's metadata reaches the file: calibrated, to act on.
"""

from __future__ import annotations

import argparse
import sys

import msgpack
import zmq
import zmq.auth

TOPIC = b"tap.aberration"
DEFAULT_ADDRESS = "tcp://127.0.0.1:17090"


def decode(parts: list[bytes]) -> dict:
    """The header of one tap.aberration message (ValueError for anything else)."""
    if len(parts) < 2 or bytes(parts[0]) != TOPIC:
        raise ValueError("not a tap.aberration message")
    header = msgpack.unpackb(bytes(parts[1]))
    if not isinstance(header, dict) or "scan_key" not in header:
        raise ValueError("a tap.aberration header is a map with scan_key")
    return header


def _pm(value: float | None, err: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g} ± {err:.2g}" if err is not None else f"{value:.{digits}g}"


def describe(m: dict) -> str:
    """One line: the scan, the fit's values with their uncertainties, the units."""
    what = "final" if m["final"] else f"fit {m['fits']} during the scan"
    if m["status"] != "ok":
        return f"scan {m['scan_number']} ({what}): fit failed: {m['error']}"
    units = "nm" if m["calibrated"] else "px/px (uncalibrated)"
    return (
        f"scan {m['scan_number']} ({what}): defocus {_pm(m['defocus'], m['defocus_err'])} {units}, "
        f"astigmatism {_pm(m['astigmatism'], m['astigmatism_err'])} {units} at "
        f"{m['astigmatism_angle']:.1f}°, rotation {m['rotation']:.1f}°; {m['positions']} positions, "
        f"residual {m['residual_px']:.3g} px"
    )


def lens_action(m: dict) -> str | None:
    """What a lens-control program would do with a message (None: nothing)."""
    if not m["final"] or m["status"] != "ok":
        return None  # provisional, or no fit: wait for the scan's final one
    if not m["calibrated"]:
        return "no lens change: uncalibrated (the session lacks the microscope's scan step or angle)"
    if m["defocus_err"] is not None and abs(m["defocus"]) < 2 * m["defocus_err"]:
        return "in focus within 2 σ: no change"
    return (
        f"would move the objective focus by {-m['defocus']:+.2f} nm and the stigmators by "
        f"{m['astigmatism']:.2f} nm at {m['astigmatism_angle']:.1f}° (before the next scan)"
    )


def subscribe(
    ctx: zmq.Context, address: str, server_key: str | None = None, client_key: str | None = None
) -> zmq.Socket:
    """A SUB socket connected to the view's aberration socket (CURVE when keys are given)."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if server_key and client_key:
        server_public, _ = zmq.auth.load_certificate(server_key)
        public, secret = zmq.auth.load_certificate(client_key)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
    sock.connect(address)
    return sock


def main(argv: list[str] | None = None) -> int:
    """Print every fit (or, with --once, wait for one final fit), and what a lens program would do."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=DEFAULT_ADDRESS)
    parser.add_argument("--once", action="store_true", help="exit after the first final fit")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for each message (default: ever)"
    )
    parser.add_argument("--server-key", help="the view's public .key file (CURVE, off loopback)")
    parser.add_argument("--client-key", help="this client's .key_secret file (listed in live.tap_clients)")
    args = parser.parse_args(argv)
    ctx = zmq.Context()
    sock = subscribe(ctx, args.address, args.server_key, args.client_key)
    try:
        while True:
            if not sock.poll(None if args.timeout is None else int(args.timeout * 1000)):
                print("no final fit before the timeout", file=sys.stderr)
                return 1
            message = decode(sock.recv_multipart())
            print(describe(message), flush=True)
            action = lens_action(message)
            if action:
                print(f"  lens control: {action}", flush=True)
            if args.once and message["final"]:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
