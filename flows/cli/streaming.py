"""`stemstream send | aggregator | node`: the streaming processes, each runnable on its own host."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import check_threshold_pair, command_settings, console, parse_scan, user_errors
from flows.settings import Settings, given
from flows.timeline import CONFIGURED, child_started
from flows.timeline import emit as timing


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _streaming_settings(ctx: typer.Context, **overrides: Any) -> Settings:
    return command_settings(ctx, streaming=given(**overrides))


def send(
    ctx: typer.Context,
    aggregator: Annotated[
        list[str], typer.Option(help="aggregator receiver address(es): 1, or 4 (one per module)")
    ],
    raw: Annotated[list[Path] | None, typer.Option(help="raw .data files (or a directory) to send")] = None,
    simulate: Annotated[str | None, typer.Option(help="send a simulated scan WIDTHxHEIGHT instead")] = None,
    script: Annotated[
        Path | None,
        typer.Option(
            help="play a scan script instead (JSON: shapes, scan numbers, pauses, seeds, doses; see "
            "streaming/camera/script.py); one line per scan sent"
        ),
    ] = None,
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
    """Emulate the four receiving servers: one process per module sends its sectors to the aggregator.
    With --script, the scans of a script one after another (the four receivers as threads)."""
    from streaming.camera.receivers import send_scan

    _configure_logging(verbose)
    if sum(given_ is not None for given_ in (raw, simulate, script)) != 1:
        raise typer.BadParameter("give one of --raw FILES, --simulate WIDTHxHEIGHT or --script FILE")
    settings = command_settings(ctx)
    rate = rate if rate is not None else settings.streaming.send_rate
    if realtime and rate is None:
        raise typer.BadParameter("--realtime needs --rate (or streaming.send_rate): the camera's frames/s")
    if script is not None:
        scan_options = {"--dose": dose, "--seed": seed, "--scan-number": scan_number, "--timeout": timeout}
        not_for_script = [name for name, value in scan_options.items() if value is not None]
        not_for_script += ["--threads"] if threads != 1 else []
        if not_for_script:
            raise typer.BadParameter(f"{', '.join(not_for_script)}: not with --script (the script says)")
        _send_script(script, aggregator, rate, realtime, settings)
        return
    source = _send_source(raw, simulate, dose, seed, settings)
    # --timeout also bounds the wait for an aggregator that is not up yet (default: 10 s of silence)
    options = dict(scan_number=scan_number, timeout=timeout, realtime=realtime)
    options |= {"send_timeout": timeout} if timeout is not None else {}
    results = send_scan(source, aggregator, rate, threads, **options)
    _print_sent(results)


def _print_sent(results: dict) -> None:
    """One line: the sectors the modules sent, dropped, and lost because the aggregator was too slow."""
    total = sum(r.sent for r in results.values())
    dropped = sum(r.dropped for r in results.values())
    overflowed = sum(r.overflowed for r in results.values())
    lost = f", {overflowed} lost: the aggregator did not take them in time" if overflowed else ""
    console.print(f"sent {total} sectors from {len(results)} modules ({dropped} dropped{lost})")


def _send_source(
    raw: list[Path] | None, simulate: str | None, dose: float | None, seed: int | None, settings: Settings
) -> Any:
    """What `send` sends: the simulated camera's scan of that shape, or the raw files."""
    from counting.geometry import ScanShape
    from counting.offline import raw_paths
    from counting.simulator import SimulatorConfig

    if simulate is None:
        return raw_paths(raw)
    w, h = parse_scan(simulate)
    sim = settings.simulator
    return SimulatorConfig(
        ScanShape(w, h),
        frames_per_position=sim.frames_per_position,
        dose=dose if dose is not None else sim.dose,
        seed=seed if seed is not None else sim.seed,
        flyback=sim.flyback,
    )


def _send_script(
    script: Path, aggregator: list[str], rate: float | None, realtime: bool, settings: Settings
) -> None:
    """`send --script`: play the script, one line per scan as it is sent."""
    from streaming.camera.script import ScriptedSend, load_script, play_script

    loaded = load_script(script, settings.simulator)

    def show(done: ScriptedSend) -> None:
        s = done.scan
        lost = (
            f", {done.overflowed} lost: the aggregator did not take them in time" if done.overflowed else ""
        )
        console.print(
            f"scan {s.scan_number}: {s.width}x{s.height}, seed {s.seed}, dose {s.dose:g}, "
            f"after {s.pause_before:g} s: sent {done.sent} sectors{lost}",
            highlight=False,
            soft_wrap=True,
        )

    played = play_script(loaded, aggregator, rate, realtime, on_sent=show)
    console.print(f"played {len(played)} scans from {script}", highlight=False, soft_wrap=True)


def aggregator(
    ctx: typer.Context,
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
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="forwarding processes K (streaming.aggregator_processes): K - 1 more bind every receiver and "
            "the node address at port + i x streaming.aggregator_port_stride; receivers and nodes use all",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the aggregator: receivers in, whole frames out to the armed nodes, state on the monitor."""
    began = time.time()
    from streaming.components import aggregator_config, server_curve
    from streaming.metrics.aggregator import run_aggregator_exported

    _configure_logging(verbose)
    child_started(began)  # timing: lines in its log (flows/timeline.py), for the session's timeline
    settings = _streaming_settings(
        ctx,
        receivers=receivers,
        nodes_bind=nodes_bind,
        n_nodes=nodes,
        monitor_bind=monitor_bind,
        scan_deadline=scan_deadline,
        aggregator_receiver_hwm=receiver_hwm,
        aggregator_node_hwm=node_hwm,
        aggregator_processes=processes,
    )
    config = aggregator_config(settings.streaming)
    timing(CONFIGURED)
    curve = server_curve(settings.streaming.curve)
    stats = run_aggregator_exported(config, curve, settings.streaming.metrics, _print_metrics, timeout)
    timing("stopped")
    logging.getLogger("stemstream").info("aggregator finished: %s", stats)
    gc.freeze()  # the exit that follows skips the heap (the final collection ignores frozen objects)


def node(
    ctx: typer.Context,
    aggregator: Annotated[str, typer.Option(help="the aggregator's node address (this node connects out)")],
    output_dir: Annotated[
        Path,
        typer.Option(
            help="where scans are written (by node 0, which the aggregator picks; same on every node)"
        ),
    ],
    dark: Annotated[Path | None, typer.Option(help="dark reference .npy (default: counting.dark)")] = None,
    gain: Annotated[Path | None, typer.Option(help="gain .npy")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="counting processes")] = None,
    background_threshold: Annotated[
        float | None, typer.Option(help="fixed background threshold, ADU")
    ] = None,
    xray_threshold: Annotated[float | None, typer.Option(help="fixed x-ray threshold, ADU")] = None,
    writer_bind: Annotated[
        str | None,
        typer.Option(help="where this node's writer listens if it becomes node 0 (streaming.writer_bind)"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="node name (default host-pid)")] = None,
    max_scans: Annotated[int | None, typer.Option(help="exit after this many scans")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a node streamer: the same command on every node; the aggregator says which one hosts the scan
    writer. Reassembles frames, counts them in worker processes, sends the events to the writer."""
    began = time.time()
    from counting.dark import load_dark, load_frame_array
    from streaming.components import node_config
    from streaming.metrics.node import run_node_exported

    _configure_logging(verbose)
    child_started(began)  # timing: lines in its log (flows/timeline.py), for the session's timeline
    check_threshold_pair(background_threshold, xray_threshold)
    settings = command_settings(
        ctx,
        counting=given(background_threshold=background_threshold, xray_threshold=xray_threshold, dark=dark),
        streaming=given(node_workers=workers, writer_bind=writer_bind),
    )
    config = node_config(
        settings.streaming,
        settings.counting,
        aggregator=aggregator,
        output_dir=output_dir,
        name=name,
        max_scans=max_scans,
    )
    dark_path = settings.counting.dark
    if dark_path is None:
        logging.getLogger("stemstream").warning(
            "no dark reference (counting.dark or --dark): counting with a zero dark and fitted thresholds"
        )
    dark_arr = load_dark(str(dark_path)) if dark_path is not None else None
    gain_arr = load_frame_array(str(gain), "gain") if gain is not None else None
    timing(CONFIGURED)
    counters = run_node_exported(config, dark_arr, gain_arr, _print_metrics)
    timing("stopped")
    logging.getLogger("stemstream").info("node finished: %s", counters)
    gc.freeze()  # the exit that follows skips the heap (the final collection ignores frozen objects)


def _print_metrics(url: str) -> None:
    """The ``metrics:`` line: where Prometheus scrapes this process (streaming.metrics)."""
    print(f"metrics: {url}", flush=True)


def register(app: typer.Typer) -> None:
    """Add the streaming commands to the CLI, with the CLI's error handling."""
    for fn in (send, aggregator, node):
        app.command(name=fn.__name__)(user_errors(fn))
