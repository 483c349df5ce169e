"""Nested dictionaries stored as HDF5 groups of attributes, and read back as plain Python values."""

from __future__ import annotations

import contextlib

import h5py
import numpy as np


def save_tree(group: h5py.Group, tree: dict, *, lenient: bool = False) -> None:
    """Store a nested dict under group: sub-dicts as groups, other values as attributes, None left out.

    lenient: for foreign metadata (a microscope's tags): '/' in a key becomes '_', and a value HDF5
    cannot hold is left out instead of raising.
    """
    for key, value in tree.items():
        name = (str(key).replace("/", "_") or "_") if lenient else key
        if isinstance(value, dict):
            save_tree(group.require_group(name), value, lenient=lenient)
        elif value is None:
            continue
        elif lenient:
            with contextlib.suppress(TypeError, ValueError):
                group.attrs[name] = value
        else:
            group.attrs[name] = value


def load_tree(group: h5py.Group, *, lists: bool = False) -> dict:
    """A group's attributes and sub-groups as a nested dict of plain values (lists: arrays as lists)."""
    out: dict = {k: plain(v, lists=lists) for k, v in group.attrs.items()}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            out[key] = load_tree(item, lists=lists)
    return out


def plain(value, *, lists: bool = False):
    """An attribute value as Python: numpy scalars as numbers, bytes as str (lists: arrays as lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    if lists and isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    return value
