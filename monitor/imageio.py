"""Reading image files robustly, and pixel sizes from their metadata.

Shared by every reader plugin.

Error policy
------------
A file that fails to decode is :class:`~monitor.errors.NotReady`: it may still
be being written (a truncated strip, a missing IFD, a zlib stream cut short),
and the service retries it with back-off until a deadline. A file that can
never become readable is :class:`~monitor.errors.BadInput`: its first bytes
are not a TIFF header, it holds an image of a shape no reader handles, or its
pixel size is outside the sane range. Every error is one line ``path: problem``.

Pixel-size policy (:func:`tiff_pixel_size_um`)
----------------------------------------------
OME ``PhysicalSizeX`` (converted from ``PhysicalSizeXUnit``, default um) first,
then ImageJ calibration (``unit`` in the ImageJ description with the
XResolution tag), then the XResolution tag with ResolutionUnit centimetre or
inch. Inch resolutions that give more than 5 um/px (72/96/300 dpi screen
defaults) and ``ResolutionUnit = none`` are not physical sizes and are ignored.
PNG files may carry a ``pHYs`` chunk in pixels per metre; the same rule applies.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import BadInput, NotReady

log = logging.getLogger(__name__)

PIXEL_SIZE_RANGE_UM = (0.05, 5.0)
#: a plane may hold at most this many pixels (16,384 x 16,384): a 46 KB TIFF that
#: declares 45,824 x 45,824 pixels is refused before a byte is decoded
MAX_PLANE_PIXELS = 1 << 28
TIFF_SUFFIXES = (".tif", ".tiff")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

_UNIT_TO_UM = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,  # micro sign U+00B5
    "μm": 1.0,  # Greek mu U+03BC (OME files use both)
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "\\u00b5m": 1.0,  # ImageJ writes the escape literally
    "nm": 1e-3,
    "pm": 1e-6,
    "a": 1e-4,
    "å": 1e-4,
    "angstrom": 1e-4,
}


@dataclass(frozen=True)
class TiffContent:
    """What a reader needs from a TIFF: pixels and metadata, decoded in full.

    ``pages`` are the 2-D (or RGB) planes of series 0 in file order (leading
    axes of a hyperstack flattened); ``series`` is series 0 as one array with
    ``axes`` (tifffile's axis letters, e.g. ``"ZYX"``, ``"YXS"``);
    ``descriptions`` holds tag 270 of every page (``None`` where absent).
    """

    pages: list[np.ndarray]
    description: str | None
    ome_xml: str | None
    imagej: dict[str, Any] | None
    resolution: tuple[float, int] | None  # XResolution (px per unit), ResolutionUnit
    descriptions: list[str | None] = field(default_factory=list)
    axes: str = ""
    series: np.ndarray | None = None


def check_pixel_size(path: Path | str, value: float, source: str) -> float:
    """Return ``value`` if it is a sane pixel size, else raise :class:`BadInput`.

    Policy: 0.05..5 um/px covers every light microscope this service serves
    (100x oil to 2x); anything else is a metadata or configuration mistake and
    is refused with one line naming the file, the value and its source.
    """
    lo, hi = PIXEL_SIZE_RANGE_UM
    if not np.isfinite(value) or not (lo <= value <= hi):
        raise BadInput(
            path, f"pixel size {value:g} um/px from {source} is outside the sane range {lo}..{hi} um/px"
        )
    return float(value)


def check_plane_pixels(path: Path | str, shape: Any) -> None:
    """Refuse a plane whose declared height x width exceeds :data:`MAX_PLANE_PIXELS`.

    Raises
    ------
    BadInput
        One line naming the declared size and the cap. Called on the size a
        file *declares*, before decoding, so a decompression bomb costs nothing.
    """
    dims = [int(d) for d in shape]
    yx = dims[-3:-1] if len(dims) >= 3 and dims[-1] in (3, 4) else dims[-2:]
    if len(yx) == 2 and yx[0] * yx[1] > MAX_PLANE_PIXELS:
        raise BadInput(path, f"declares {yx[1]} x {yx[0]} pixels per plane, above the limit of {MAX_PLANE_PIXELS:,} pixels")


def _check_header(path: Path) -> None:
    """Missing/short file: NotReady; a complete header that is not TIFF: BadInput."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise NotReady(path, "file not found (moved or still being created?)") from None
    except OSError as e:
        raise NotReady(path, f"cannot open ({e.strerror or e})") from None
    if len(head) == 0:
        raise NotReady(path, "empty file (still being written?)")
    if len(head) < 8:
        raise NotReady(path, f"only {len(head)} bytes (still being written?)")
    if head[:4] not in TIFF_MAGIC:
        raise BadInput(path, f"not a TIFF file (starts with {head[:4]!r})")


class _TiffNoiseFilter(logging.Filter):
    """Demote tifffile's truncation warnings to DEBUG: :func:`read_tiff` reports them as NotReady."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_TIFF_FILTER = _TiffNoiseFilter()


def read_tiff(path: Path) -> TiffContent:
    """Decode every page of a TIFF and collect the metadata readers need.

    The pixels are decoded in full here, so a file that is still being
    written fails now (as :class:`NotReady`) rather than later in the
    pipeline. Any decoder error (tifffile, zlib, struct, imagecodecs) is
    NotReady; only a wrong header is :class:`BadInput`.
    """
    import tifffile

    tlog = logging.getLogger("tifffile")
    if _TIFF_FILTER not in tlog.filters:
        tlog.addFilter(_TIFF_FILTER)
    path = Path(path)
    _check_header(path)
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.pages:
                raise NotReady(path, "TIFF has no pages (truncated?)")
            broken = _ifd_chain_broken(tf)
            if broken:
                raise NotReady(path, f"TIFF truncated or still being written ({broken})")
            for page in tf.pages:  # the declared sizes, before any pixel is decoded
                check_plane_pixels(path, getattr(page, "shape", ()))
            series = tf.series[0] if tf.series else None
            arr: np.ndarray | None = None
            axes = ""
            pages: list[np.ndarray]
            if series is not None and series.ndim >= 3 and "S" not in series.axes:
                arr = np.asarray(series.asarray())
                axes = series.axes
                yx = axes.index("Y") if "Y" in axes else arr.ndim - 2
                flat = arr.reshape((-1,) + arr.shape[yx:]) if yx > 0 else arr[None]
                pages = list(flat)
            else:
                pages = [np.asarray(p.asarray()) for p in tf.pages]  # type: ignore[union-attr]
                if series is not None and len(pages) == 1:
                    arr, axes = pages[0], series.axes
            descriptions: list[str | None] = []
            for p in tf.pages:
                d = getattr(p, "description", None)
                descriptions.append(d or None)
            first = tf.pages[0]
            return TiffContent(
                pages=pages,
                description=descriptions[0] if descriptions else None,
                ome_xml=tf.ome_metadata,
                imagej=tf.imagej_metadata,
                resolution=_resolution(first),
                descriptions=descriptions,
                axes=axes,
                series=arr,
            )
    except (NotReady, BadInput):
        raise
    except MemoryError:
        raise BadInput(path, "TIFF too large to decode in memory") from None
    except Exception as e:  # decoder errors are arbitrary types (zlib.error, struct.error, ...)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise NotReady(path, f"TIFF decode failed, truncated or still being written? ({type(e).__name__}: {msg})") from None


def _ifd_chain_broken(tf: Any) -> str | None:
    """Why the IFD chain ends early, or None when it ends with a zero pointer.

    tifffile stops at an IFD offset beyond the end of the file with only a
    log message, so a multi-page file caught mid-write would read as fewer
    pages; this check turns that into NotReady.
    """
    import struct as _struct

    try:
        n_pages = len(tf.pages)
        last = tf.pages[n_pages - 1]
        t = tf.tiff
        fh = tf.filehandle
        size = fh.size
        fh.seek(last.offset)
        raw = fh.read(t.tagnosize)
        if len(raw) < t.tagnosize:
            return f"IFD {n_pages - 1} cut short"
        (n_tags,) = _struct.unpack(t.tagnoformat, raw)
        fh.seek(last.offset + t.tagnosize + n_tags * t.tagsize)
        raw = fh.read(t.offsetsize)
        if len(raw) < t.offsetsize:
            return f"IFD {n_pages - 1} cut short"
        (nxt,) = _struct.unpack(t.offsetformat, raw)
        if nxt and nxt >= size:
            return f"page {n_pages} starts at byte {nxt}, beyond the {size} bytes on disk"
    except Exception as e:  # an unreadable chain is the same symptom
        return f"IFD chain unreadable: {type(e).__name__}"
    return None


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
    except Exception:  # a malformed tag means "no resolution", never a failed read
        return None


def unit_to_um(unit: str) -> float | None:
    """Micrometres per ``unit`` (``"nm"``, ``"µm"``, ``"μm"``, ``"micron"``, ``"\\u00B5m"`` ...), or None."""
    u = unit.strip()
    return _UNIT_TO_UM.get(u) or _UNIT_TO_UM.get(u.lower())


def tiff_pixel_size_um(content: TiffContent) -> tuple[float, str] | None:
    """Pixel size (um/px) and its source ``metadata:<ome|imagej|resolution>``, or None.

    Policy in the module docstring: OME, then ImageJ, then resolution tags;
    screen-default inch resolutions and unitless resolutions are ignored.
    """
    if content.ome_xml:
        v = ome_pixel_size_um(content.ome_xml)
        if v:
            return v, "metadata:ome"
    if content.resolution is None:
        return None
    per_unit, code = content.resolution
    if per_unit <= 0:
        return None
    if content.imagej:
        f = unit_to_um(str(content.imagej.get("unit", "")))
        if f:
            return f / per_unit, "metadata:imagej"
    if code == 3:  # centimetre
        return 1e4 / per_unit, "metadata:resolution"
    if code == 2:  # inch
        um = 25400.0 / per_unit
        if um <= PIXEL_SIZE_RANGE_UM[1]:
            return um, "metadata:resolution"
    return None


def parse_xml_safely(text: str) -> Any:
    """Parse XML with DTDs, entities and external references forbidden (defusedxml).

    Raises ``ValueError`` with a one-line reason for a malformed document or
    one that declares a DTD (entity-expansion "billion laughs" attacks need
    one; no instrument format this service reads uses a DTD).
    """
    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException

    try:
        return DET.fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise ValueError(f"XML refused: it declares a DTD or entities, which are not allowed ({type(e).__name__})") from None
    except Exception as e:  # ParseError and friends
        raise ValueError(f"malformed XML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def local_name(tag: object) -> str:
    """Element tag without its ``{namespace}``."""
    t = str(tag)
    return t.rsplit("}", 1)[-1]


def ome_pixel_size_um(ome_xml: str) -> float | None:
    """PhysicalSizeX of the first Pixels element, converted from its unit (default um).

    A malformed document, one with a DTD, or an unknown unit gives None.
    """
    try:
        root = parse_xml_safely(ome_xml)
    except ValueError as e:
        log.debug("OME-XML ignored: %s", e)
        return None
    for el in root.iter():
        if local_name(el.tag) == "Pixels" and "PhysicalSizeX" in el.attrib:
            try:
                v = float(el.attrib["PhysicalSizeX"])
            except ValueError:
                return None
            f = unit_to_um(el.attrib.get("PhysicalSizeXUnit", "µm"))
            return v * f if f and v > 0 else None
    return None


def read_raster(path: Path) -> np.ndarray:
    """PNG/JPEG/BMP as (Y, X) or (Y, X, 3) RGB in the file's dtype (8 or 16 bit).

    Alpha is dropped. An empty or undecodable file is :class:`NotReady`
    (JPEG and PNG are written front to back, so a partial file fails here).
    """
    import cv2

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise NotReady(path, "empty file (still being written?)")
    except OSError as e:
        raise NotReady(path, f"cannot stat ({e.strerror})") from None
    dims = _png_dims(path)
    if dims is not None:
        check_plane_pixels(path, dims)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise NotReady(path, "image decode failed (truncated or not an image)")
    if img.ndim == 3:
        if img.shape[2] == 1:
            return img[..., 0]
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return img


def _png_dims(path: Path) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, or None for other files."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", head[16:24])
    return int(h), int(w)


def png_pixel_size_um(path: Path) -> float | None:
    """Pixel size from a PNG ``pHYs`` chunk in pixels per metre, or None.

    Unit 0 (aspect ratio only) and sizes above 5 um/px (72 dpi screen
    defaults) are not physical sizes and give None.
    """
    try:
        with Path(path).open("rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"pHYs":
                    data = f.read(9)
                    if len(data) < 9:
                        return None
                    ppx, _ppy, unit = struct.unpack(">IIB", data)
                    if unit != 1 or ppx == 0:
                        return None
                    um = 1e6 / ppx
                    return um if um <= PIXEL_SIZE_RANGE_UM[1] else None
                if kind in (b"IDAT", b"IEND"):
                    return None
                f.seek(length + 4, 1)
    except OSError:
        return None


def as_plane(path: Path | str, name: str, img: np.ndarray) -> np.ndarray:
    """Normalise one channel image to (Y, X) or RGB (Y, X, 3); refuse anything else.

    Singleton axes are squeezed, RGBA loses its alpha, and a single-sample
    last axis becomes grey. Other shapes are :class:`BadInput` naming the
    channel and shape. Float planes: NaN/inf pixels are set to the finite
    range (logged); a plane with no finite pixel is :class:`BadInput`.
    """
    a = np.asarray(img)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] == 1 and a.shape[2] not in (3, 4):
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[2] not in (3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (separate) RGB
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3):
        if a.shape[0] < 1 or a.shape[1] < 1:
            raise BadInput(path, f"channel {name!r} is empty (shape {a.shape})")
        if a.dtype == bool:
            a = a.astype(np.uint8)
        if a.dtype.kind not in "uif":
            raise BadInput(path, f"channel {name!r} has unsupported dtype {a.dtype}")
        if a.dtype.kind == "f":
            finite = np.isfinite(a)
            if not finite.any():
                raise BadInput(path, f"channel {name!r} holds no finite value (all NaN/inf)")
            if not finite.all():  # a few dead pixels: the frame's own range, not NaN, downstream
                lo, hi = float(a[finite].min()), float(a[finite].max())
                log.warning("%s: channel %r: %d non-finite pixel(s) set to the image range", path, name, int((~finite).sum()))
                a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        return a
    raise BadInput(path, f"channel {name!r} has unsupported shape {tuple(np.asarray(img).shape)} (want Y,X or Y,X,3)")


_TRAILING_NUM = re.compile(r"(\d+)(?!.*\d)")


def trailing_number(stem: str) -> int | None:
    """The last run of digits in ``stem`` (the timepoint of most exports), or None."""
    m = _TRAILING_NUM.search(stem)
    return int(m.group(1)) if m else None


def head_contains(path: Path, needle: bytes, n_bytes: int = 65536) -> bool:
    """Whether ``needle`` occurs in the first ``n_bytes`` of a file (False if unreadable).

    Cheap content sniffing for ``accepts``: TIFF writers put tag 270 near the
    start of the file.
    """
    try:
        with Path(path).open("rb") as f:
            return needle in f.read(n_bytes)
    except OSError:
        return False


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB (or grey) image (reports, overlays, ``classify --html``)."""
    import cv2

    img = np.ascontiguousarray(rgb)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
