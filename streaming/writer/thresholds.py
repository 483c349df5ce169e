"""Threshold brokering: which thresholds every node counts a scan with, and the calibration sent with them.

Fixed thresholds go out the moment a node begins the scan. Otherwise the nodes offer their lowest-numbered
complete frames, and the thresholds are estimated from them once every node closed its offer (so streamed
and offline counting of the same data use the same sample frames), or earlier when the writer waited out a
node that went silent. The estimation is compiled and loaded when the broker is made, so the first scan
waits no longer than later ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from counting.geometry import FRAME_SHAPE
from counting.kernel import Thresholds
from counting.thresholds import (
    ThresholdConfig,
    ThresholdError,
    estimate_thresholds,
    fixed_threshold_metadata,
    warm_up_estimation,
)
from streaming.protocol import control as p
from streaming.protocol.calibration import calibration_digest, calibration_parts

log = logging.getLogger(__name__)


@dataclass
class SampleOffer:
    """The sample frames the nodes of one scan offer, and which nodes have closed (or lost) their offer."""

    n_nodes: int
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # by frame number
    closed: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)  # nodes the aggregator lost: they offer no more
    limit: int = 0  # frames kept (the lowest-numbered: the only ones the estimate uses); 0: all

    @property
    def all_in(self) -> bool:
        """Every node closed its offer or was lost."""
        return len(self.closed) + len(self.lost - self.closed) >= self.n_nodes

    def add(self, header: p.SampleHeader, parts: list) -> None:
        """Take one node's sample frames (ProtocolError when they do not match their header)."""
        if len(parts) != len(header.frame_numbers):
            raise p.ProtocolError("sample frame count does not match its header")
        for number, part in zip(header.frame_numbers, parts, strict=True):
            number, frame = int(number), np.frombuffer(part.buffer, np.uint16).reshape(FRAME_SHAPE)
            if self.limit and len(self.frames) >= self.limit and number not in self.frames:
                highest = max(self.frames)
                if number > highest:
                    continue  # never among the frames the estimate uses: not kept
                del self.frames[highest]
            self.frames[number] = frame.copy()
        if header.last:
            self.closed.add(header.name)
        self.lost.update(header.lost)


class ThresholdBroker:
    """Decides each scan's thresholds: the fixed ones, or an estimate from the frames the nodes offer."""

    def __init__(
        self,
        fixed: Thresholds | None,
        estimate: ThresholdConfig,
        dark: np.ndarray | None,
        gain: np.ndarray | None,
    ) -> None:
        if fixed is None:
            warm_up_estimation(estimate, dark, gain)  # so the first scan waits no longer than later ones
        self._fixed, self._estimate = fixed, estimate
        self._dark, self._gain = dark, gain
        # Every node counts with the writer's dark and gain: they follow each ScanThresholds as two parts.
        self.calibration_parts = calibration_parts(dark, gain)
        self.calibration = calibration_digest(*self.calibration_parts)

    @property
    def dark_reference(self) -> str:
        """What the frames were counted against: a zero dark is said, never implied."""
        if self._dark is None:
            return "none: zero dark, fitted thresholds"
        return f"float32 dark, digest {self.calibration[:16]}"

    def fixed(self, scan_number: int) -> p.ScanThresholds | None:
        """The fixed thresholds for a scan, or None when they are estimated."""
        t = self._fixed
        if t is None:
            return None
        return p.ScanThresholds(
            scan_number=scan_number,
            background=t.background,
            xray=t.xray,
            metadata=fixed_threshold_metadata(t),
            calibration=self.calibration,
        )

    def settle(
        self, scan_number: int, offer: SampleOffer, *, waited_out: bool = False
    ) -> p.ScanThresholds | None:
        """The estimated thresholds once every node closed its offer (or, waited_out, from what the others
        offered: a node that died before closing its offer must not leave the survivors' frames uncounted);
        None while offers are still open. Thresholds of NaN carry the reason no estimate was possible."""
        if not offer.all_in and not waited_out:
            return None
        numbers = sorted(offer.frames)[: self._estimate.sample_frames]
        try:
            if not numbers:
                raise ThresholdError("no complete frame arrived, so thresholds cannot be estimated")
            samples = np.stack([offer.frames[n] for n in numbers])
            est = estimate_thresholds(samples, self._dark, self._estimate, self._gain)
            thresholds = p.ScanThresholds(
                scan_number=scan_number,
                background=est.background_threshold,
                xray=est.x_ray_threshold,
                metadata=est.metadata(),
                calibration=self.calibration,
            )
        except ThresholdError as exc:
            log.error("scan %d: %s", scan_number, exc)
            nan = float("nan")  # the nodes count nothing, and the stop record says why
            thresholds = p.ScanThresholds(
                scan_number=scan_number, background=nan, xray=nan, metadata={"error": str(exc)}
            )
        offer.frames.clear()
        return thresholds
