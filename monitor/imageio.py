"""Reading image files robustly, and pixel sizes from their metadata.

Shared by every reader plugin. A file that fails to decode is
:class:`~monitor.errors.NotReady` (it may still be being written; the service
retries with back-off until a deadline) unless it is certainly broken (empty
after the deadline, wrong format), which is :class:`~monitor.errors.BadInput`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.errors import BadInput, NotReady

PIXEL_SIZE_RANGE_UM = (0.05, 5.0)
TIFF_SUFFIXES = (".tif", ".tiff")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

_UNIT_TO_UM = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "\\u00B5m": 1.0, "nm": 1e-3, "pm": 1e-6, "a": 1e-4, "å": 1e-4,
}


@dataclass(frozen=True)
class TiffContent:
    pages: list[np.ndarray]
    description: str | None
    ome_xml: str | None
    imagej: dict | None
    resolution: tuple[float, int] | None  # XResolution (px per unit), ResolutionUnit
    page_names: list[str]


def check_pixel_size(path: Path | str, value: float, source: str) -> float:
    """A pixel size outside 0.05..5 um/px is an error naming the file and the source."""
    lo, hi = PIXEL_SIZE_RANGE_UM
    if not (lo <= value <= hi) or not np.isfinite(value):
        raise BadInput(path, f"pixel size {value:g} um/px from {source} is outside the sane range {lo}..{hi} um/px")
    return float(value)


def read_tiff(path: Path) -> TiffContent:
    """All pages (series 0 first) and the metadata readers need."""
    import tifffile

    try:
        size = path.stat().st_size
    except OSError as e:
        raise NotReady(path, f"cannot stat ({e.strerror})") from None
    if size == 0:
        raise NotReady(path, "empty file (still being written?)")
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.pages:
                raise NotReady(path, "TIFF has no pages (truncated?)")
            series = tf.series[0] if tf.series else None
            pages: list[np.ndarray] = []
            if series is not None and series.ndim >= 3 and series.axes[-1] not in "S":
                arr = series.asarray()
                # flatten leading axes into pages of (Y, X)
                ax = series.axes
                yx = ax.index("Y")
                arr = arr.reshape((-1,) + arr.shape[yx:]) if yx > 0 else arr[None]
                pages = [a for a in arr]
            else:
                pages = [p.asarray() for p in tf.pages]  # type: ignore[union-attr]
            first = tf.pages[0]
            desc = first.description if hasattr(first, "description") else None  # type: ignore[union-attr]
            res = _resolution(first)
            return TiffContent(
                pages=pages,
                description=desc or None,
                ome_xml=tf.ome_metadata,
                imagej=tf.imagej_metadata,
                resolution=res,
                page_names=[],
            )
    except (NotReady, BadInput):
        raise
    except tifffile.TiffFileError as e:
        raise NotReady(path, f"not a readable TIFF yet ({e})") from None
    except (ValueError, OSError, EOFError, IndexError, KeyError, MemoryError) as e:
        raise NotReady(path, f"TIFF decode failed ({type(e).__name__}: {e})") from None


def _resolution(page: object) -> tuple[float, int] | None:
    """(pixels per unit, TIFF ResolutionUnit code) or None."""
    try:
        tags = page.tags  # type: ignore[attr-defined]
        xr = tags.get("XResolution")
        if xr is None:
            return None
        num, den = xr.value
        if not num or not den:
            return None
        unit = tags.get("ResolutionUnit")
        return num / den, int(unit.value) if unit is not None else 2
    except Exception:
        return None


def tiff_pixel_size_um(content: TiffContent) -> tuple[float, str] | None:
    """Pixel size from OME, then ImageJ, then the resolution tags; None if absent.

    Inch-based resolutions of 72/96/300 dpi are screen defaults, not physical
    sizes, so an inch resolution that gives more than 5 um/px is ignored.
    """
    if content.ome_xml:
        v = ome_pixel_size_um(content.ome_xml)
        if v:
            return v, "metadata:ome"
    if content.resolution is None:
        return None
    per_unit, code = content.resolution
    if content.imagej:
        unit = str(content.imagej.get("unit", "")).replace("\\u00B5", "µ").lower()
        f = _UNIT_TO_UM.get(unit)
        if f:
            return f / per_unit, "metadata:imagej"
    if code == 3:  # centimetre
        return 1e4 / per_unit, "metadata:resolution"
    if code == 2:
        um = 25400.0 / per_unit
        if um <= PIXEL_SIZE_RANGE_UM[1]:
            return um, "metadata:resolution"
    return None


def ome_pixel_size_um(ome_xml: str) -> float | None:
    """PhysicalSizeX of the first Pixels element, converted from its unit (default um)."""
    try:
        root = ET.fromstring(ome_xml)  # OME-XML carries no DTD; ET expands no external entities
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            v = float(el.attrib["PhysicalSizeX"])
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            f = _UNIT_TO_UM.get(unit.lower(), _UNIT_TO_UM.get(unit))
            return v * f if f else None
    return None


def read_raster(path: Path) -> np.ndarray:
    """PNG/JPEG/BMP as (Y, X) or (Y, X, 3) in the file's dtype (8 or 16 bit)."""
    import cv2

    try:
        if path.stat().st_size == 0:
            raise NotReady(path, "empty file (still being written?)")
    except OSError as e:
        raise NotReady(path, f"cannot stat ({e.strerror})") from None
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise NotReady(path, "image decode failed (truncated or not an image)")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return img


_TRAILING_NUM = re.compile(r"(\d+)(?!.*\d)")


def trailing_number(stem: str) -> int | None:
    m = _TRAILING_NUM.search(stem)
    return int(m.group(1)) if m else None
