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
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from monitor.config import Regex
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
from monitor.readkit import choose_pixel_size, guess_role, key_from_match
from monitor.records import Acquisition, FrameKey
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
        size, source = choose_pixel_size(path, [meta_size], self.o.pixel_size_um, self.o.prefer_config_pixel_size, "readers.tiff.pixel_size_um")
        if len(pages) == 1:
            channels = {channel or "image": as_plane(path, channel or "image", pages[0])}
        else:
            names = list(self.o.page_channels) + [f"page{i}" for i in range(len(self.o.page_channels), len(pages))]
            channels = {names[i]: as_plane(path, names[i], p) for i, p in enumerate(pages)}
        # a generic file says nothing about its channels but their names
        roles = {n: r for n in channels if (r := guess_role(n)) is not None}
        return Acquisition(
            path, key, channels, size, source, self.o.instrument, metadata={"pages": str(len(pages))}, roles=roles
        )


PLUGIN = plugin_spec(
    "tiff", "TIFF/OME-TIFF/ImageJ/PNG/JPEG; pixel size from metadata or config", Options,
    lambda o, ctx: TiffReader(o, ctx.experiment),
)
