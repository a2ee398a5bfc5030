"""Generic TIFF / OME-TIFF / ImageJ TIFF / PNG / JPEG reader.

Pixel size: OME ``PhysicalSizeX`` (with its unit), then ImageJ calibration,
then the XResolution tag (PNG: the ``pHYs`` chunk); otherwise
``pixel_size_um`` from the options (source ``"config"``); otherwise the file
is refused with one line. ``prefer_config_pixel_size`` makes the configured
value win over the file's. Every value is checked against 0.05..5 um/px.

Frame identity comes from the file name through ``pattern`` (a regular
expression with named groups ``experiment``, ``well``, ``field``,
``timepoint``, ``channel``); names that do not match fall back to the last
number in the name as the timepoint. A multi-page TIFF gives one channel per
page, named by ``page_channels`` or ``page<N>``. 8-, 16- and 32-bit grey and
RGB images keep their dtype; RGBA loses its alpha.

Multi-plane files whose planes are channels
-------------------------------------------
A JSON sidecar beside the file (``<name>.json``, as celldetective and many
lab scripts write it) names the planes in order (``channels``) and may give
the pixel size (``spatial_calibration`` in um/px, source
``"metadata:sidecar"``, ranked after the TIFF's own calibration); without a
sidecar, ``channels = [...]`` in the reader's options names them. Named planes
are taken from the pages, or from the samples of a single page (a TIFF saved
as "RGB" with 3 or 4 separate samples, which is what such files often are).
Each plane gets its role from its name (:func:`monitor.readkit.guess_role`:
label-free, death marker, nuclear stain, other fluorescence, else ``other``).
A plane without a name is carried as ``plane<N>`` (role ``other``), never
refused; a sidecar that names more planes than the file holds, or that is
not valid JSON, is one :class:`~monitor.errors.BadInput` line naming the
sidecar.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitor.config import Regex
from monitor.errors import BadInput
from monitor.imageio import (
    RASTER_SUFFIXES,
    TIFF_SUFFIXES,
    as_plane,
    png_pixel_size_um,
    read_raster,
    read_tiff,
    tiff_pixel_size_um,
)
from monitor.protocols import ReaderBase
from monitor.readkit import choose_pixel_size, guess_role, key_from_match, stem_of
from monitor.records import Acquisition, ChannelRole, FrameKey
from monitor.registry import plugin_spec

log = logging.getLogger(__name__)

DEFAULT_PATTERN = (
    r"^(?:(?P<experiment>.+?)_)?(?P<well>[A-Za-z]{1,2}\d{1,3})_f(?P<field>\d+)_t(?P<timepoint>\d+)"
    r"(?:_(?P<channel>.+?))?(?:\.ome)?\.(?:tiff?|png|jpe?g|bmp)$"
)


class Options(BaseModel):
    """Options of the generic reader (``[readers.tiff]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pixel_size_um: float | None = Field(None, gt=0, description="used when the file has no pixel size")
    prefer_config_pixel_size: bool = Field(False, description="configured size wins over the file's metadata")
    pattern: Regex = Field(DEFAULT_PATTERN, description="file-name regex with named groups experiment/well/field/timepoint/channel")
    page_channels: list[str] = Field(default_factory=list, description="channel names of the pages of a multi-page TIFF")
    channels: list[str] = Field(default_factory=list, description="names of the planes (pages, or separate samples of one page) in order, "
                                "when no JSON sidecar names them")
    sidecar: bool = Field(True, description="read <name>.json beside the file for plane names (channels) and pixel size (spatial_calibration)")
    instrument: str = Field("generic", min_length=1)


class TiffReader(ReaderBase):
    """The fallback reader: any TIFF/PNG/JPEG, identity from the file name."""

    name = "tiff"
    specificity = 0

    def __init__(self, options: Options, experiment: str = "default"):
        self.o = options
        self.rx = re.compile(options.pattern, re.I)
        self.experiment = experiment

    def accepts(self, path: Path) -> str | None:
        """Take any file with a TIFF/PNG/JPEG/BMP suffix."""
        suf = Path(path).suffix.lower()
        if suf in TIFF_SUFFIXES or suf in RASTER_SUFFIXES:
            return None
        return f"suffix {suf or '(none)'} is not a TIFF/PNG/JPEG"

    def identity(self, path: Path) -> tuple[FrameKey, str | None]:
        """Frame key and channel from the file name (pattern, else trailing number)."""
        m = self.rx.match(Path(path).name)
        return key_from_match(m, path, self.experiment), (m.group("channel") if m and "channel" in m.groupdict() else None)

    def read(self, path: Path) -> Acquisition:
        """Decode the file; see the module docstring for the pixel-size policy."""
        path = Path(path)
        key, channel = self.identity(path)
        meta_size: tuple[float, str] | None = None
        if path.suffix.lower() in TIFF_SUFFIXES:
            content = read_tiff(path)
            pages = content.pages
            meta_size = tiff_pixel_size_um(content)
        else:
            pages = [read_raster(path)]
            png = png_pixel_size_um(path) if path.suffix.lower() == ".png" else None
            meta_size = (png, "metadata:png") if png else None
        side = read_sidecar(path) if self.o.sidecar else None
        planes = (side or {}).get("channels") or list(self.o.channels)
        side_size = (side or {}).get("spatial_calibration")
        size, source = choose_pixel_size(path, [meta_size, (float(side_size), "metadata:sidecar") if side_size else None],
                                         self.o.pixel_size_um, self.o.prefer_config_pixel_size, "readers.tiff.pixel_size_um")
        roles: dict[str, ChannelRole] = {}
        if planes:
            channels = named_planes(path, pages, planes, "sidecar " + str(sidecar_path(path)) if side else "readers.tiff.channels")
            roles = {n: guess_role(n) or "other" for n in channels}
        elif len(pages) == 1:
            channels = {channel or "image": as_plane(path, channel or "image", pages[0])}
        else:
            names = list(self.o.page_channels) + [f"page{i}" for i in range(len(self.o.page_channels), len(pages))]
            channels = {names[i]: as_plane(path, names[i], p) for i, p in enumerate(pages)}
        if not roles:  # a generic file says nothing about its channels but their names
            roles = {n: r for n in channels if (r := guess_role(n)) is not None}
        meta = {"pages": str(len(pages))}
        if side:
            meta["sidecar"] = sidecar_path(path).name
        return Acquisition(path, key, channels, size, source, self.o.instrument, metadata=meta, roles=roles)


def sidecar_path(path: Path) -> Path:
    """``<name>.json`` beside ``<name>.tif``."""
    return path.with_name(stem_of(path) + ".json")


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON sidecar of ``path`` (None when there is none).

    Raises
    ------
    BadInput
        The sidecar is not a JSON object, or its ``channels`` is not a list of
        names, or its ``spatial_calibration`` is not a positive number.
    """
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(side, f"sidecar is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadInput(side, "sidecar is not a JSON object")
    ch = data.get("channels")
    if ch is not None and (not isinstance(ch, list) or not all(isinstance(c, str) and c.strip() for c in ch)):
        raise BadInput(side, f"sidecar 'channels' must be a list of plane names (got {ch!r})")
    cal = data.get("spatial_calibration")
    if cal is not None and (isinstance(cal, bool) or not isinstance(cal, int | float) or cal <= 0):
        raise BadInput(side, f"sidecar 'spatial_calibration' must be a positive number of um per pixel (got {cal!r})")
    return data


def named_planes(path: Path, pages: list[np.ndarray], names: list[str], named_by: str) -> dict[str, np.ndarray]:
    """Planes named in order: the pages, or the separate samples of a single page.

    A plane beyond the names is carried as ``plane<N>``; more names than
    planes is :class:`BadInput` naming ``named_by``.
    """
    if len(pages) == 1 and pages[0].ndim == 3 and len(names) > 1:
        a = pages[0]
        stack = list(a) if a.shape[0] <= a.shape[-1] else list(np.moveaxis(a, -1, 0))  # S first (planar) or last
    else:
        stack = list(pages)
    if len(names) > len(stack):
        raise BadInput(path, f"{named_by} names {len(names)} planes ({', '.join(names)}) but the file holds {len(stack)}")
    full = list(names) + [f"plane{i}" for i in range(len(names), len(stack))]
    return {full[i]: as_plane(path, full[i], p) for i, p in enumerate(stack)}


PLUGIN = plugin_spec(
    "tiff", "TIFF/OME-TIFF/ImageJ/PNG/JPEG; pixel size from metadata or config", Options,
    lambda o, ctx: TiffReader(o, ctx.experiment),
)
