"""The one place settings become component configs: node streamer, scan writer, aggregator.

Component configs carry no defaults of their own and no renamed fields: every default lives in the
settings sections (streaming.settings, counting.settings).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from counting.settings import CountingSettings
from streaming.aggregator.config import AggregatorConfig
from streaming.settings import CurveSettings, StreamingSettings
from streaming.transport.security import CurveClientConfig, CurveServerConfig

if TYPE_CHECKING:  # the counting runtime (numba, scipy, h5py) is imported by the configs that need it:
    # the aggregator, which imports this module too, counts nothing (0.4 s less of its start)
    from counting.kernel import Thresholds
    from counting.pipeline import CountingOptions
    from counting.thresholds import ThresholdConfig
    from streaming.node.config import NodeConfig
    from streaming.writer.writer import WriterConfig


def writer_config(streaming: StreamingSettings, counting: CountingSettings, output_dir: Path) -> WriterConfig:
    """The scan writer's config."""
    from streaming.writer.writer import WriterConfig

    return WriterConfig(
        output_dir=Path(output_dir),
        session_id=streaming.session_id,
        name_template=streaming.name_template,
        timezone=streaming.timezone,
        fixed=fixed_thresholds(counting),
        estimate=threshold_config(counting),
        writer_deadline=streaming.writer_deadline,
    )


def node_config(
    streaming: StreamingSettings,
    counting: CountingSettings,
    *,
    aggregator: str,
    output_dir: Path,
    name: str | None = None,
    max_scans: int | None = None,
) -> NodeConfig:
    """A node streamer's config: the settings plus where this node connects and writes."""
    from streaming.node.config import NodeConfig

    return NodeConfig(
        aggregator=aggregator,
        name=name or f"{socket.gethostname()}-{os.getpid()}",
        output_dir=Path(output_dir),
        streaming=streaming,
        estimate=threshold_config(counting),
        writer=writer_config(streaming, counting, output_dir),
        curve=client_curve(streaming.curve),
        max_scans=max_scans,
    )


def server_curve(curve: CurveSettings) -> CurveServerConfig | None:
    """The aggregator's CURVE config from its key files, or None (plain: loopback or a trusted network)."""
    if curve.server_secret_file is None:
        return None
    return CurveServerConfig.from_files(curve.server_secret_file, curve.allowed_clients)


def client_curve(curve: CurveSettings) -> CurveClientConfig | None:
    """A node's (or monitor's) CURVE config from its key files, or None."""
    if curve.client_secret_file is None and curve.server_public_file is None:
        return None
    if curve.client_secret_file is None or curve.server_public_file is None:
        raise ValueError("CURVE needs both client_secret_file and server_public_file on a node")
    return CurveClientConfig.from_files(curve.client_secret_file, curve.server_public_file)


def threshold_config(counting: CountingSettings) -> ThresholdConfig:
    """How thresholds are estimated, from the counting settings (same field names)."""
    from counting.thresholds import ThresholdConfig

    return ThresholdConfig(
        number_of_samples=counting.number_of_samples,
        sample_frames=counting.sample_frames,
        background_n_sigma=counting.background_n_sigma,
        xray_n_sigma=counting.xray_n_sigma,
        seed=counting.seed,
    )


def fixed_thresholds(counting: CountingSettings) -> Thresholds | None:
    """The fixed thresholds, when both are set."""
    if counting.background_threshold is None or counting.xray_threshold is None:
        return None
    from counting.kernel import Thresholds

    return Thresholds(counting.background_threshold, counting.xray_threshold)


def counting_options(counting: CountingSettings) -> CountingOptions:
    """What offline counting counts with, from the counting settings."""
    from counting.pipeline import CountingOptions

    return CountingOptions(fixed_thresholds(counting), threshold_config(counting), counting.workers)


def aggregator_config(streaming: StreamingSettings) -> AggregatorConfig:
    """The aggregator's (and its forwarding processes') config."""
    return AggregatorConfig.of(streaming)
