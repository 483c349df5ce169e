"""Live phase contrast from counted events: streaming parallax (tilt-corrected bright field and the fitted
defocus, astigmatism and rotation) and integrated DPC. Plain numerics (numpy, scipy, numba), no I/O.

Modules: model (the aberration model), bins (BF disk bins), accumulate (per-position bin counts from
counted batches), correlate (subpixel cross-correlation), fit (AberrationFit), shift_sum (tilt-corrected
BF), idpc (integrated DPC). Import the module you need; this package loads nothing by itself.
"""
