"""`stemstream send | aggregator | node`: the streaming processes, each runnable on its own host."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.settings import Settings, given, load_settings


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _streaming_settings(**overrides: Any) -> Settings:
    return load_settings(streaming=given(**overrides))


def server_curve(settings: Settings) -> Any:
    """The aggregator's CURVE config from settings, or None (plain, localhost only)."""
    from streaming.security import CurveServerConfig

    c = settings.streaming.curve
    if c.server_secret_file is None:
        return None
    return CurveServerConfig.from_files(c.server_secret_file, c.allowed_clients)


def client_curve(settings: Settings) -> Any:
    """A node's CURVE config from settings, or None."""
    from streaming.security import CurveClientConfig

    c = settings.streaming.curve
    if c.client_secret_file is None and c.server_public_file is None:
        return None
    if c.client_secret_file is None or c.server_public_file is None:
        raise ValueError("CURVE needs both client_secret_file and server_public_file on a node")
    return CurveClientConfig.from_files(c.client_secret_file, c.server_public_file)


def send(
    aggregator: Annotated[
        list[str], typer.Option(help="aggregator receiver address(es): 1, or 4 (one per module)")
    ],
    raw: Annotated[list[Path] | None, typer.Option(help="raw .data files (or a directory) to send")] = None,
    simulate: Annotated[str | None, typer.Option(help="send a simulated scan WIDTHxHEIGHT instead")] = None,
    dose: Annotated[float | None, typer.Option(help="simulated electrons per frame")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    scan_number: Annotated[int | None, typer.Option(help="override the scan number")] = None,
    rate: Annotated[
        float | None, typer.Option(help="frames/s per module (default: as fast as possible)")
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="receiver threads per module")] = 1,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
    realtime: Annotated[
        bool,
        typer.Option(
            "--realtime",
            help="run as the camera does, at --rate: never wait for the aggregator, drop (and count) "
            "sectors it cannot take in time",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Emulate the four receiving servers: one process per module sends its sectors to the aggregator."""
    from counting.geometry import ScanShape
    from counting.offline import raw_paths
    from counting.simulator import SimulatorConfig
    from flows.cli import _parse_scan, console
    from streaming.scan_sender import send_scan

    _configure_logging(verbose)
    if (raw is None) == (simulate is None):
        raise typer.BadParameter("give --raw FILES or --simulate WIDTHxHEIGHT")
    settings = load_settings()
    if simulate is not None:
        w, h = _parse_scan(simulate)
        sim = settings.simulator
        source: Any = SimulatorConfig(
            ScanShape(w, h),
            frames_per_position=sim.frames_per_position,
            dose=dose if dose is not None else sim.dose,
            seed=seed if seed is not None else sim.seed,
        )
    else:
        source = raw_paths(raw)
    rate = rate if rate is not None else settings.streaming.send_rate
    if realtime and rate is None:
        raise typer.BadParameter("--realtime needs --rate (or streaming.send_rate): the camera's frames/s")
    results = send_scan(
        source,
        aggregator,
        rate,
        threads,
        scan_number=scan_number,
        timeout=timeout,
        realtime=realtime,
    )
    total = sum(r.sent for r in results.values())
    dropped = sum(r.dropped for r in results.values())
    overflowed = sum(r.overflowed for r in results.values())
    lost = f", {overflowed} lost: the aggregator did not take them in time" if overflowed else ""
    console.print(f"sent {total} sectors from {len(results)} modules ({dropped} dropped{lost})")


def aggregator(
    receivers: Annotated[
        list[str] | None, typer.Option(help="PULL address(es) to bind for the receivers")
    ] = None,
    nodes_bind: Annotated[str | None, typer.Option(help="ROUTER address the nodes connect to")] = None,
    nodes: Annotated[int | None, typer.Option(min=1, help="node streamers per scan")] = None,
    monitor_bind: Annotated[str | None, typer.Option(help="PUB address for state and counters")] = None,
    scan_deadline: Annotated[
        float | None, typer.Option(help="seconds without a sector before a scan ends")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    receiver_hwm: Annotated[
        int | None, typer.Option(min=1, help="sectors queued per receiver connection (x 166 kB: memory)")
    ] = None,
    node_hwm: Annotated[
        int | None, typer.Option(min=1, help="sectors queued per node (x 166 kB: memory)")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the aggregator: receivers in, whole frames out to the armed nodes, state on the monitor."""
    from streaming.aggregator import run_aggregator

    _configure_logging(verbose)
    settings = _streaming_settings(
        receivers=receivers,
        nodes_bind=nodes_bind,
        n_nodes=nodes,
        monitor_bind=monitor_bind,
        scan_deadline=scan_deadline,
        aggregator_receiver_hwm=receiver_hwm,
        aggregator_node_hwm=node_hwm,
    )
    st = settings.streaming
    stats = run_aggregator(
        st.receivers,
        st.nodes_bind,
        st.n_nodes,
        st.monitor_bind,
        st.scan_deadline,
        st.heartbeat,
        server_curve(settings),
        timeout=timeout,
        receiver_hwm=st.aggregator_receiver_hwm,
        node_hwm=st.aggregator_node_hwm,
    )
    logging.getLogger("stemstream").info("aggregator finished: %s", stats)


def node(
    aggregator: Annotated[str, typer.Option(help="the aggregator's node address (this node connects out)")],
    output_dir: Annotated[Path | None, typer.Option(help="host the scan writer and write scans here")] = None,
    writer: Annotated[
        str | None, typer.Option(help="or: the address of the writer another node hosts")
    ] = None,
    writer_bind: Annotated[
        str | None, typer.Option(help="where the hosted writer listens for other nodes")
    ] = None,
    writer_port: Annotated[
        int | None,
        typer.Option(
            help="under Slurm: rank 0 hosts the writer on this port of the launch node, others connect"
        ),
    ] = None,
    dark: Annotated[Path | None, typer.Option(help="dark reference .npy")] = None,
    gain: Annotated[Path | None, typer.Option(help="gain .npy")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="counting processes")] = None,
    background_threshold: Annotated[
        float | None, typer.Option(help="fixed background threshold, ADU")
    ] = None,
    xray_threshold: Annotated[float | None, typer.Option(help="fixed x-ray threshold, ADU")] = None,
    name: Annotated[str | None, typer.Option(help="node name (default host-pid)")] = None,
    max_scans: Annotated[int | None, typer.Option(help="exit after this many scans")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a node streamer: reassemble, count in worker processes, send events to the scan writer."""
    from counting.dark import load_dark, load_frame_array
    from flows.cli import check_threshold_pair, counting_options
    from streaming.node import NodeConfig, run_node

    _configure_logging(verbose)
    check_threshold_pair(background_threshold, xray_threshold)
    if writer_port is not None:
        output_dir, writer, writer_bind = slurm_writer_role(output_dir, writer_port)
        if writer is not None:
            background_threshold = xray_threshold = None  # the writer's host decides thresholds for all
    settings = load_settings(
        counting=given(background_threshold=background_threshold, xray_threshold=xray_threshold)
    )
    st = settings.streaming
    opts = counting_options(settings.counting)
    extra = {} if name is None else {"name": name}
    config = NodeConfig(
        aggregator=aggregator,
        output_dir=output_dir,
        writer=writer,
        writer_bind=writer_bind,
        workers=workers if workers is not None else st.node_workers,
        batch_size=st.node_batch,
        slots=st.node_slots,
        fixed=opts.fixed,
        estimate=opts.estimate,
        session_id=st.session_id,
        name_template=st.name_template,
        scan_deadline=st.node_deadline,
        frame_timeout=st.frame_timeout,
        hold_limit=st.node_hold_limit,
        writer_deadline=st.writer_deadline,
        heartbeat=st.heartbeat,
        curve=client_curve(settings),
        max_scans=max_scans,
        **extra,
    )
    dark_arr = load_dark(str(dark)) if dark is not None else None
    gain_arr = load_frame_array(str(gain), "gain") if gain is not None else None
    counters = run_node(config, dark_arr, gain_arr)
    logging.getLogger("stemstream").info("node finished: %s", counters)


def slurm_writer_role(output_dir: Path | None, port: int) -> tuple[Path | None, str | None, str | None]:
    """(output_dir, writer, writer_bind) for this task: Slurm rank 0 hosts the writer, the others connect."""
    import os

    if output_dir is None:
        raise typer.BadParameter("--writer-port needs --output-dir (used by the rank that hosts the writer)")
    host = os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
    address = f"tcp://{host}:{port}"
    if int(os.environ.get("SLURM_PROCID", "0")) == 0:
        return output_dir, None, address
    return None, address, None


def register(app: typer.Typer, wrap: Any) -> None:
    """Add the streaming commands to the CLI, with the CLI's error handling."""
    for fn in (send, aggregator, node):
        app.command(name=fn.__name__)(wrap(fn))
