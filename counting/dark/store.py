"""The dark references of a facility: a directory of timestamped ``dark_<UTC time>.npy`` files (the float32
mean that ``counting.dark`` takes), each with ``.json`` statistics and ``.stats.npz`` maps (noise, hot
pixels). A dark is never overwritten: a name taken in the same second gets a numbered variant. Sessions
take the newest dark of their camera by default (an explicit ``counting.dark`` wins).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from counting.dark.stats import DarkReference
from counting.microscope_meta import file_digest
from counting.storage.durable import FinalName

_NAME = re.compile(r"^dark_(\d{8}T\d{6}Z)(?:-(\d+))?\.npy$")


@dataclass(frozen=True)
class DarkInfo:
    """A stored dark reference: where it is, when it was made, from what, and its statistics."""

    path: str
    created: float  # Unix time
    camera: str  # "instrument", or "simulated:<detector seed>" (a dark only fits its own detector)
    source: str  # how it was acquired: "streamed scan <n>", "simulator", "raw files"
    frames: int
    mean: float
    noise: float
    hot_pixels: int
    sha256: str
    stats: dict

    @property
    def age_hours(self) -> float:
        """Hours since it was made."""
        return (time.time() - self.created) / 3600.0

    def to_json(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def save_dark(
    directory: Path, ref: DarkReference, camera: str, source: str, created: float | None = None
) -> DarkInfo:
    """Store a dark reference under a new timestamped name in ``directory`` (created if needed); the .npy
    is written last-renamed, after its statistics, so a dark that is listed is complete."""
    directory.mkdir(parents=True, exist_ok=True)
    created = time.time() if created is None else created
    stamp = datetime.fromtimestamp(created, UTC).strftime("%Y%m%dT%H%M%SZ")
    path = _free_name(directory, stamp)
    stats_path = path.with_suffix(".stats.npz")
    with open(_exclusive(stats_path), "wb") as fh:
        np.savez(fh, noise=ref.noise, hot=ref.hot)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as fh:
        np.save(fh, ref.mean)
        fh.flush()
        os.fsync(fh.fileno())
    s = ref.stats
    info = DarkInfo(
        str(path.resolve()), created, camera, source, ref.frames, s["mean"], s["noise"], s["hot_pixels"],
        file_digest(tmp), s,
    )  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(info.to_json(), indent=2))
    # never replaces (FileExistsError if the name was taken meanwhile); without hard links, a no-replace rename
    if not FinalName().publish(tmp, path):
        os.unlink(tmp)  # the complete dark is named: the temporary second name goes
    return info


def list_darks(directory: Path) -> list[DarkInfo]:
    """Every complete dark in the directory, oldest first (a .npy whose statistics are unreadable is
    listed from the file alone)."""
    if not directory.is_dir():
        return []
    out = []
    for path in directory.iterdir():
        if not _NAME.match(path.name):
            continue
        try:
            data = json.loads(path.with_suffix(".json").read_text())
            out.append(DarkInfo(**{**data, "path": str(path.resolve())}))
        except (OSError, ValueError, TypeError):
            out.append(
                DarkInfo(str(path.resolve()), path.stat().st_mtime, "unknown", "unknown", 0, 0, 0, 0, "", {})
            )
    return sorted(out, key=lambda d: (d.created, _variant(Path(d.path).name)))


def _variant(name: str) -> int:
    """0 for dark_<time>.npy, k for its numbered variant dark_<time>-k.npy (made later in that second)."""
    m = _NAME.match(name)
    return int(m.group(2)) if m and m.group(2) else 0


def newest_dark(directory: Path, camera: str | None = None) -> DarkInfo | None:
    """The newest dark (of ``camera`` when given), or None."""
    darks = [d for d in list_darks(directory) if camera is None or d.camera == camera]
    return darks[-1] if darks else None


def _free_name(directory: Path, stamp: str) -> Path:
    path = directory / f"dark_{stamp}.npy"
    k = 1
    while path.exists() or path.with_suffix(".json").exists() or path.with_suffix(".stats.npz").exists():
        path = directory / f"dark_{stamp}-{k}.npy"
        k += 1
    return path


def _exclusive(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
