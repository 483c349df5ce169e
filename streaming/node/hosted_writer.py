"""The scan writer as hosted by node 0: started when the aggregator designates this node, bound where the
settings say (``streaming.writer_bind``), announced under an address the other nodes can reach."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import numpy as np
import zmq

from streaming.settings import StreamingSettings
from streaming.writer.writer import ScanWriter, WriterConfig

_WILDCARDS = {"*", "0.0.0.0", "::", "[::]"}


class HostedWriter:
    """Starts, announces and stops the writer this node hosts (if it is designated to)."""

    def __init__(self, config: WriterConfig, streaming: StreamingSettings, context: zmq.Context) -> None:
        self.config, self._streaming, self._ctx = config, streaming, context
        self._writer: ScanWriter | None = None
        self.address = ""  # as the other nodes reach it; empty while not hosting
        self.local_address = ""  # as this node reaches it

    @property
    def error(self) -> str | None:
        """Why the writer failed (then this node must stop), or None."""
        return self._writer.error if self._writer is not None else None

    def start(self, dark: np.ndarray | None, gain: np.ndarray | None) -> str:
        """Bind and start the writer; returns its announced address."""
        self._writer = ScanWriter(self._streaming.writer_bind, self.config, dark, gain, self._ctx).start()
        endpoint = self._writer.endpoint  # the real port when bound to port 0
        self.local_address = announced(endpoint, "127.0.0.1")
        self.address = announced(endpoint, self._streaming.writer_host or socket.gethostname())
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


def announced(endpoint: str, host: str) -> str:
    """A bound endpoint as others connect to it: a wildcard host (tcp://0.0.0.0:PORT) becomes ``host``."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.hostname is None:
        return endpoint
    bound = parts.netloc.rsplit(":", 1)[0]
    return f"tcp://{host}:{parts.port}" if bound in _WILDCARDS else endpoint
