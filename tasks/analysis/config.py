"""What an analysis computes and with which parameters: the paper's defaults, scaled for small scans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from counting.geometry import FRAME_COLS
from tasks.settings import AnalysisSettings


@dataclass(frozen=True)
class AnalysisConfig:
    """What to compute and with which parameters; defaults follow the paper, scaled for small scans."""

    energy_ev: float = 300e3
    convergence_semiangle_mrad: float = 17.1  # Q calibration = this / measured probe radius (paper)
    r_pixel_size_angstrom: float = 0.36  # scan step (paper: 0.03615877 nm)
    bin_frames: int = 16  # 576² -> 36² patterns, as the paper
    fill_incomplete: bool = True  # positions without all their frames get the mean of their neighbours
    probe_thresh_upper: float = 0.95  # get_probe_size threshold (paper)
    # virtual detectors, in units of the measured probe radius
    virtual: bool = True
    bf_radius_factor: float = 1.0
    adf_inner_factor: float = 1.2  # outside the disk, and its deflection
    adf_outer_factor: float | None = None  # None: out to the detector edge
    # centre of mass and DPC
    dpc: bool = True
    com_rotation_deg: float | None = 256.0  # scan-to-detector rotation (paper's instrument); None: fitted
    com_transpose: bool | None = False
    dpc_q_highpass: float = 0.03
    dpc_max_iter: int = 16
    # parallax
    parallax: bool = True
    parallax_padding_px: int = 8  # paper 16 on a 400² scan
    parallax_edge_blend: int = 4  # paper 8
    parallax_threshold_intensity: float = 0.8
    parallax_defocus_guess_angstrom: float = 50.0  # paper; pre-shifts the BF images before alignment
    parallax_min_alignment_bin: int = 4
    parallax_iter_at_min_bin: int = 2  # paper 12; cost grows linearly
    parallax_aberration_fit: bool = True
    parallax_aberration_correct: bool = True
    parallax_max_positions: int = 256 * 256  # beyond this parallax is skipped (time and memory grow with it)
    png_dpi: int = 100
    # Analyse the flyback column too; the default is the setting's (AnalysisSettings: its one default).
    keep_flyback: bool = AnalysisSettings.model_fields["keep_flyback"].default

    def __post_init__(self) -> None:
        if self.bin_frames < 1 or FRAME_COLS % self.bin_frames:
            raise ValueError(f"bin_frames must divide {FRAME_COLS}, got {self.bin_frames}")
        if self.energy_ev <= 0 or self.convergence_semiangle_mrad <= 0 or self.r_pixel_size_angstrom <= 0:
            raise ValueError("energy, convergence semiangle and R pixel size must be positive")


def analysis_config(settings: AnalysisSettings, **paper: Any) -> AnalysisConfig:
    """What analyse_scan runs with, from the analysis settings; ``paper`` overrides other parameters."""
    return AnalysisConfig(keep_flyback=settings.keep_flyback, **paper)
