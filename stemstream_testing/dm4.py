"""A minimal DM4 (Gatan DigitalMicrograph 4) writer for tests: nothing in the product writes DM4, but the
microscope's metadata arrives as DM4 files, so tests need real ones with known contents.

Format (as published by Gatan/ncempy and exactly as ``ncempy.io.dm.fileDM`` parses it):

    header      >u4 version = 4, >u8 size of the rest of the file, >u4 byte order = 1 (tag data little-endian)
    tag group   u1 sorted, u1 open, >u8 number of entries, then the entries
    tag entry   u1 kind (20 group, 21 data), >u2 label length, label (latin-1; empty = unlabeled), >u8 size
                of what follows, then a tag group (kind 20) or: "%%%%", >u8 number of type words, >u8 type,
                [array: >u8 element type, >u8 length], then the value(s) little-endian
    types       2 int16, 3 int32, 4 uint16, 5 uint32, 6 float32, 7 float64, 8 bool, 20 array; strings are
                arrays of uint16 characters (DM's own way)

A file holds a root group with ``ImageList`` (unlabeled image groups, each ``ImageData`` with
``Calibrations.Dimension`` (Origin, Scale, Units per axis, x first), ``Data``, ``DataType``, ``Dimensions``,
and ``ImageTags``). As GMS saves STEM images, the first image is a small RGB thumbnail and the second the
image itself, so ncempy's ``getDataset(0)`` and ``getMetadata(0)`` return the second (``.ImageList.2``).
Nested dicts in ``tags`` become nested tag groups; floats are written as float64 (DM's "number"), ints as
int32, bools as bool, strings as uint16 arrays.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_GROUP, _DATA = 20, 21
_ARRAY = 20
_DM_IMAGE_TYPE = {
    np.dtype(np.float32): 2,
    np.dtype(np.uint16): 10,
    np.dtype(np.int32): 7,
    np.dtype(np.uint32): 11,
}
_ELEMENT_TYPE = {
    np.dtype(np.float32): 6,
    np.dtype(np.uint16): 4,
    np.dtype(np.int32): 3,
    np.dtype(np.uint32): 5,
}
_RGB_TYPE = 23  # DM's RGB image data type (the thumbnail)


def write_dm4(
    path: str | Path,
    image: np.ndarray,
    pixel_size: float | tuple[float, float],
    pixel_unit: str = "nm",
    tags: dict | None = None,
    thumbnail: bool = True,
) -> Path:
    """Write ``image`` (2-D, rows = y) as a DM4 file with the pixel size (one value, or (y, x)) in
    ``pixel_unit`` and ``tags`` (nested dict) as its ImageTags; returns the path."""
    image = np.ascontiguousarray(image)
    if image.ndim != 2 or image.dtype not in _DM_IMAGE_TYPE:
        raise ValueError(
            f"image must be 2-D float32, uint16, int32 or uint32, got {image.dtype} {image.shape}"
        )
    dy, dx = (pixel_size, pixel_size) if np.isscalar(pixel_size) else pixel_size
    images = []
    if thumbnail:
        thumb = np.zeros((8, 8), np.uint32)  # RGBA words; never read by ncempy
        images.append(_image_group(thumb, _RGB_TYPE, 5, (1.0, 1.0), "", {}))
    element = _ELEMENT_TYPE[image.dtype]
    images.append(_image_group(image, _DM_IMAGE_TYPE[image.dtype], element, (dx, dy), pixel_unit, tags or {}))
    root = _group([(b"ImageList", _group([(b"", g) for g in images])), (b"ImageSourceList", _group([]))])
    body = root
    data = struct.pack(">IQI", 4, len(body) + 8, 1) + body + b"\x00" * 8  # DM4 ends with 8 zero bytes
    path = Path(path)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------- encoding
def _group(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A tag group's bytes from (label, encoded entry body) pairs; a body starting a group is a group."""
    out = [struct.pack(">BBQ", 1, 0, len(entries))]
    for label, body in entries:
        kind = _DATA if body[:4] == b"%%%%" else _GROUP
        out.append(struct.pack(">BH", kind, len(label)) + label + struct.pack(">Q", len(body)) + body)
    return b"".join(out)


def _value(value: object) -> bytes:
    """A data tag's body: the delimiter, its type words and its little-endian value."""
    if isinstance(value, bool):
        return b"%%%%" + struct.pack(">QQ", 1, 8) + struct.pack("<B", int(value))
    if isinstance(value, int | np.integer):
        return b"%%%%" + struct.pack(">QQ", 1, 3) + struct.pack("<i", int(value))
    if isinstance(value, float | np.floating):
        return b"%%%%" + struct.pack(">QQ", 1, 7) + struct.pack("<d", float(value))
    if isinstance(value, str):
        chars = np.frombuffer(value.encode("utf-16-le"), "<u2")
        return _array(chars, 4)
    raise TypeError(f"cannot write a {type(value).__name__} tag")


def _array(values: np.ndarray, element: int) -> bytes:
    """An array tag's body (simple element type)."""
    dtype = {2: "<i2", 3: "<i4", 4: "<u2", 5: "<u4", 6: "<f4", 7: "<f8"}[element]
    data = np.ascontiguousarray(values).astype(dtype, copy=False).tobytes()
    return b"%%%%" + struct.pack(">QQQQ", 3, _ARRAY, element, values.size) + data


def _tags(tags: dict) -> bytes:
    entries = []
    for key, value in tags.items():
        body = _tags(value) if isinstance(value, dict) else _value(value)
        entries.append((str(key).encode("latin-1"), body))
    return _group(entries)


def _image_group(
    image: np.ndarray, data_type: int, element: int, scale_xy: tuple[float, float], unit: str, tags: dict
) -> bytes:
    """One ImageList entry: ImageData (calibrations x then y, data, type, dimensions x then y), ImageTags."""
    dims = [
        _group(
            [
                (b"Origin", _value(0.0)),
                (b"Scale", _f32(s)),
                (b"Units", _value(unit) if unit else _array(np.zeros(0, np.uint16), 4)),
            ]
        )
        for s in scale_xy
    ]
    calibrations = _group([(b"Dimension", _group([(b"", d) for d in dims]))])
    height, width = image.shape
    image_data = _group(
        [
            (b"Calibrations", calibrations),
            (b"Data", _array(image.ravel(), element)),
            (b"DataType", _value(int(data_type))),
            (b"Dimensions", _group([(b"", _u32(width)), (b"", _u32(height))])),
            (b"PixelDepth", _value(int(image.dtype.itemsize))),
        ]
    )
    return _group([(b"ImageData", image_data), (b"ImageTags", _tags(tags)), (b"Name", _value("image"))])


def _f32(value: float) -> bytes:
    return b"%%%%" + struct.pack(">QQ", 1, 6) + struct.pack("<f", float(value))


def _u32(value: int) -> bytes:
    return b"%%%%" + struct.pack(">QQ", 1, 5) + struct.pack("<I", int(value))
