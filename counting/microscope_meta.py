"""The microscope's record of a scan (its tags, calibrations and HAADF image) in the scan's HDF5.

Layout added to a counted scan (stempy's for the image; stempy reads what it knows and ignores the rest):

    /stem/images                  float32 (1, height, width): the HAADF image, attrs names = ["HAADF"]
                                  (stempy.io.save_stem_images' layout), source = the microscope's file
    /metadata/microscope          attrs: source_file, source_format, source_sha256, source_mtime,
                                  scan_number, step_y_angstrom, step_x_angstrom, convergence_semiangle_mrad,
                                  convergence_source, energy_ev (a value the file lacks is left out)
    /metadata/microscope/tags     the file's image tags, one group per tag group

How it is added without ever putting the counted events at risk: the finished file is never opened for
writing. A copy of it (checked against the checksum the writer recorded, so a file changed meanwhile is
never touched) gets the new groups, is fsynced and then takes the file's name in one atomic rename; a
crash leaves either the file as the writer wrote it or the complete new one, never half of either, and a
file that already has microscope metadata is refused (nothing is replaced). The copy costs one read and
one write of the file, in 1 MiB chunks (flat memory), once per scan, off the data path (counting.storage.amend,
shared with the stream's phase fit).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from counting.errors import PermanentError
from counting.storage.amend import amend_scan_file
from counting.storage.attrs import load_tree, plain, save_tree
from counting.storage.durable import file_sha256

MICROSCOPE_GROUP = "metadata/microscope"
STEM_IMAGES = "stem/images"


class MicroscopeMetadataError(PermanentError, ValueError):
    """Microscope metadata cannot be read, or cannot be added to a scan file."""


@dataclass(frozen=True)
class MicroscopeMetadata:
    """What the microscope recorded about one scan; a calibration it lacks is None."""

    source: str  # the file it came from
    source_format: str  # "dm4" | "json"
    source_sha256: str
    source_mtime: float
    scan_number: int | None = None  # as the file says (NCEM: 4Dcamera Parameters.scan_number)
    step_angstrom: tuple[float, float] | None = None  # real-space step (y, x) between scan positions, Å
    convergence_semiangle_mrad: float | None = None
    convergence_source: str = ""  # the tag path or setting it came from
    energy_ev: float | None = None  # beam energy (the accelerating voltage times e)
    tags: dict = field(default_factory=dict, repr=False)  # nested tag groups, plain values
    haadf: np.ndarray | None = field(default=None, repr=False)  # (height, width)

    def attrs(self) -> dict:
        """The /metadata/microscope attributes (missing values left out)."""
        out: dict = {
            "source_file": self.source,
            "source_format": self.source_format,
            "source_sha256": self.source_sha256,
            "source_mtime": float(self.source_mtime),
            "scan_number": self.scan_number,
            "convergence_semiangle_mrad": self.convergence_semiangle_mrad,
            "convergence_source": self.convergence_source or None,
            "energy_ev": self.energy_ev,
        }
        if self.step_angstrom is not None:
            out["step_y_angstrom"], out["step_x_angstrom"] = (float(s) for s in self.step_angstrom)
        if self.haadf is not None:
            out["haadf_shape"] = list(self.haadf.shape)
        return {k: v for k, v in out.items() if v is not None}

    def summary(self) -> dict:
        """The calibrations and source as plain JSON values (for stop records and the catalogue)."""
        out = {k: v for k, v in self.attrs().items() if k != "haadf_shape"}
        out["haadf"] = self.haadf is not None
        return out


def file_digest(path: Path) -> str:
    """Hex sha256 of a file, in 1 MiB chunks."""
    return file_sha256(path)


def attach_microscope(
    path: str | os.PathLike,
    meta: MicroscopeMetadata,
    expected_sha256: str | None,
    before_replace: Callable[[str], None] | None = None,
) -> str:
    """Add ``meta`` to the finished scan file at ``path`` (see the module docstring: a checked copy renamed
    over it, counting.storage.amend); returns the new file's sha256. MicroscopeMetadataError if the file changed
    since the writer recorded ``expected_sha256``, already has microscope metadata, or is not HDF5; OSError
    for storage. ``before_replace(new_sha256)`` runs once the copy is complete and fsynced, just before it
    takes the file's name (the caller stages the new stop record there); if it raises, the file is left
    untouched."""
    return amend_scan_file(
        path,
        lambda f: _write(f, meta),
        expected_sha256,
        refuse=(MICROSCOPE_GROUP, STEM_IMAGES),
        what="microscope metadata",
        before_replace=before_replace,
        error=MicroscopeMetadataError,
    )


def read_microscope(path: str | os.PathLike) -> tuple[dict, np.ndarray | None]:
    """The /metadata/microscope attributes (with ``tags``) and the HAADF image of a scan file, or ({}, None)."""
    with h5py.File(path, "r") as f:
        attrs: dict = {}
        if MICROSCOPE_GROUP in f:
            group = f[MICROSCOPE_GROUP]
            attrs = {k: plain(v, lists=True) for k, v in group.attrs.items()}
            if "tags" in group:
                attrs["tags"] = load_tree(group["tags"], lists=True)
        haadf = None
        if STEM_IMAGES in f:
            images = f[STEM_IMAGES]
            names = [plain(n) for n in images.attrs.get("names", [])]
            index = names.index("HAADF") if "HAADF" in names else 0
            haadf = np.asarray(images[index])
        return attrs, haadf


# ------------------------------------------------------------------------------------------- internal
def _write(f: h5py.File, meta: MicroscopeMetadata) -> None:
    group = f.require_group("metadata").create_group("microscope")
    for key, value in meta.attrs().items():
        group.attrs[key] = value
    group.attrs["attached_time"] = time.time()
    save_tree(group.create_group("tags"), meta.tags, lenient=True)
    if meta.haadf is not None:
        images = f.require_group("stem").create_dataset(
            "images", data=np.asarray(meta.haadf, np.float32)[None]
        )
        images.attrs["names"] = ["HAADF"]
        images.attrs["source"] = meta.source
