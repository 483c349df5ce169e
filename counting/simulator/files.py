"""Write a simulated scan to disk as a real acquisition would leave it: raw v5 files, dark, ground truth."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from counting.dark import dark_reference
from counting.geometry import FrameBatch, ScanShape
from counting.raw import write_raw_scan
from counting.simulator import SimulatedCamera, SimulatorConfig


@dataclass(frozen=True)
class SimulatedFiles:
    """Where a simulated scan was written and what it holds."""

    raw_files: list[Path]
    dark: Path
    truth: Path
    frames: int
    electrons: int


def write_simulated_scan(
    out: str | os.PathLike,
    scan_number: int = 1,
    width: int = 64,
    height: int = 64,
    dose: float = 200.0,
    seed: int = 0,
    frames_per_position: int = 1,
    dark_frames: int = 100,
    files_per_module: int = 1,
    flyback: bool = True,
) -> SimulatedFiles:
    """Simulate a scan into ``out``: data_scan*_module*.data, dark.npy (from dark frames), truth.npz."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    camera = SimulatedCamera(
        SimulatorConfig(
            ScanShape(width, height),
            frames_per_position=frames_per_position,
            dose=dose,
            seed=seed,
            flyback=flyback,
        )
    )
    dark_path = out / "dark.npy"
    np.save(dark_path, dark_reference(camera.dark_frames(dark_frames)))

    truth: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    positions: list[np.ndarray] = []

    def batches() -> Iterator[FrameBatch]:
        for batch, frame_truth in camera.iter_batches_with_truth(64):
            truth.extend(frame_truth)
            numbers.append(batch.frame_numbers)
            positions.append(batch.positions)
            yield batch

    raw_files = write_raw_scan(
        out, scan_number, camera.scan, batches(), version=5, files_per_module=files_per_module
    )
    sizes = np.array([len(t) for t in truth], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    truth_path = out / "truth.npz"
    np.savez_compressed(
        truth_path,
        frame_numbers=np.concatenate(numbers),
        positions=np.concatenate(positions),
        electron_indices=np.concatenate(truth) if truth else np.empty(0, np.uint32),
        electron_offsets=offsets,
        sample=camera.sample_image(),
        true_dark=camera.dark(),
    )
    return SimulatedFiles(raw_files, dark_path, truth_path, int(len(sizes)), int(sizes.sum()))
