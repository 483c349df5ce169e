"""The scan writer as hosted by node 0: started when the aggregator designates this node, bound where the
settings say (``streaming.writer_bind``), announced under an address the other nodes can reach."""

from __future__ import annotations

import logging
import socket

import numpy as np
import zmq

from streaming.settings import StreamingSettings
from streaming.transport.addresses import announced
from streaming.transport.security import CurveClientConfig, peer_curve
from streaming.writer.writer import ScanWriter, WriterConfig

log = logging.getLogger("streaming.node.streamer")  # its line is logged as the node streamer's


class HostedWriter:
    """Starts, announces and stops the writer this node hosts (if it is designated to)."""

    def __init__(
        self,
        config: WriterConfig,
        streaming: StreamingSettings,
        context: zmq.Context,
        curve: CurveClientConfig | None = None,
    ) -> None:
        self.config, self._streaming, self._ctx = config, streaming, context
        self._curve = peer_curve(curve)[0] if curve is not None else None  # the nodes' keys (see peer_curve)
        self._writer: ScanWriter | None = None
        self.address = ""  # as the other nodes reach it; empty while not hosting
        self.local_address = ""  # as this node reaches it

    @property
    def scan_writer(self) -> ScanWriter | None:
        """The writer this node hosts, or None (for its metrics: streaming.metrics.node)."""
        return self._writer

    @property
    def error(self) -> str | None:
        """Why the writer failed or its thread died (then this node must stop), or None."""
        if self._writer is None:
            return None
        if self._writer.error is None and self._writer.died:
            return "the scan writer's thread died (its error is logged above)"
        return self._writer.error

    def start(self, dark: np.ndarray | None, gain: np.ndarray | None, node: str) -> str:
        """Bind and start the writer (for the node of that name); returns its announced address."""
        self._writer = ScanWriter(
            self._streaming.writer_bind,
            self.config,
            dark,
            gain,
            self._ctx,
            max_positions=self._streaming.max_scan_positions,
            curve=self._curve,
        ).start()
        endpoint = self._writer.endpoint  # the real port when bound to port 0
        self.local_address = announced(endpoint, "127.0.0.1")
        self.address = announced(endpoint, self._streaming.writer_host or socket.gethostname())
        log.info(
            "%s: hosting the scan writer at %s, writing to %s", node, self.address, self.config.output_dir
        )
        return self.address

    def stop(self) -> str | None:
        """Stop the writer after its pending writes; returns its error, if any."""
        if self._writer is None:
            return None
        writer, self._writer = self._writer, None
        try:
            writer.stop()
        finally:
            error = writer.error
        return error
