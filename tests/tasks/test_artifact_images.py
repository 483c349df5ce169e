"""Analysis images embedded in Prefect artifacts: the same picture in fewer bytes."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tasks.analysis.artifact import artifact_png  # noqa: E402


def test_artifact_png_is_the_same_picture_smaller(tmp_path: Path):
    fig, ax = plt.subplots(figsize=(4.2, 4.3), dpi=100)
    im = ax.imshow(np.random.default_rng(0).normal(size=(64, 64)).cumsum(axis=1), cmap="RdBu_r")
    fig.colorbar(im)
    ax.set_title("CoM x, detector px")
    path = tmp_path / "plot.png"
    fig.savefig(path)
    plt.close(fig)
    small = artifact_png(path)
    assert len(small) < 0.6 * path.stat().st_size
    a = np.asarray(Image.open(path).convert("RGB"), np.float64)
    b = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"), np.float64)
    assert a.shape == b.shape and np.abs(a - b).mean() < 3  # a few levels of 255 on average
