"""The analysis settings section; composed into the one Settings object in flows/settings.py.

Apart from tasks.analysis.analyse so that building settings never imports the analysis (h5py, py4DSTEM).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class AnalysisSettings(BaseModel):
    """How counted scans are analysed (tasks.analysis.analyse)."""

    keep_flyback: bool = Field(
        False,
        description="analyse the flyback column too (the last scan column, recorded while the beam flies "
        "back); by default it is dropped, as stempy's SparseArray.from_hdf5(keep_flyback=False) does",
    )
