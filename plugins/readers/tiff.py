"""Generic TIFF / OME-TIFF / ImageJ TIFF / PNG / JPEG reader.

Pixel size: OME ``PhysicalSizeX`` (with its unit), then ImageJ metadata, then
the XResolution tag; otherwise ``pixel_size_um`` from the options; otherwise
the file is refused with one line. Frame identity comes from the file name
through ``pattern`` (a regular expression with named groups ``experiment``,
``well``, ``field``, ``timepoint``, ``channel``); names that do not match fall
back to the last number in the name as the timepoint. A multi-page TIFF gives
one channel per page, named by ``page_channels`` or ``page<N>``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import BadInput
from monitor.imageio import (
    RASTER_SUFFIXES,
    TIFF_SUFFIXES,
    check_pixel_size,
    read_raster,
    read_tiff,
    tiff_pixel_size_um,
    trailing_number,
)
from monitor.protocols import BuildContext
from monitor.records import Acquisition, FrameKey

DEFAULT_PATTERN = (
    r"^(?:(?P<experiment>.+?)_)?(?P<well>[A-Za-z]{1,2}\d{1,3})_f(?P<field>\d+)_t(?P<timepoint>\d+)"
    r"(?:_(?P<channel>.+?))?(?:\.ome)?\.(?:tiff?|png|jpe?g)$"
)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pixel_size_um: float | None = Field(None, gt=0, description="used when the file has no pixel size")
    prefer_config_pixel_size: bool = False
    pattern: str = DEFAULT_PATTERN
    page_channels: list[str] = Field(default_factory=list)
    instrument: str = "generic"


class TiffReader:
    name = "tiff"
    specificity = 0

    def __init__(self, options: Options, experiment: str = "default"):
        self.o = options
        self.rx = re.compile(options.pattern, re.I)
        self.experiment = experiment

    def accepts(self, path: Path) -> str | None:
        suf = path.suffix.lower()
        if suf in TIFF_SUFFIXES or suf in RASTER_SUFFIXES:
            return None
        return f"suffix {suf or '(none)'} is not a TIFF/PNG/JPEG"

    def identity(self, path: Path) -> tuple[FrameKey, str | None]:
        m = self.rx.match(path.name)
        if m:
            g = m.groupdict()
            key = FrameKey(g.get("experiment") or self.experiment, g.get("well") or "-", g.get("field") or "1", int(g["timepoint"]))
            return key, g.get("channel")
        tp = trailing_number(path.stem)
        return FrameKey(self.experiment, "-", "1", tp if tp is not None else 0), None

    def read(self, path: Path) -> Acquisition:
        path = Path(path)
        key, channel = self.identity(path)
        meta_size = None
        if path.suffix.lower() in TIFF_SUFFIXES:
            content = read_tiff(path)
            pages = content.pages
            meta_size = tiff_pixel_size_um(content)
        else:
            pages = [read_raster(path)]
        if self.o.pixel_size_um is not None and (meta_size is None or self.o.prefer_config_pixel_size):
            size, source = self.o.pixel_size_um, "config"
        elif meta_size is not None:
            size, source = meta_size
        else:
            raise BadInput(path, "no pixel size in the file's metadata and none configured (set readers.tiff.pixel_size_um)")
        check_pixel_size(path, size, source)
        if len(pages) == 1:
            channels = {channel or "image": pages[0]}
        else:
            names = list(self.o.page_channels) + [f"page{i}" for i in range(len(self.o.page_channels), len(pages))]
            channels = {names[i]: p for i, p in enumerate(pages)}
        for name, img in channels.items():
            if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
                raise BadInput(path, f"channel {name!r} has unsupported shape {img.shape}")
        return Acquisition(path, key, channels, size, source, self.o.instrument)


class _Spec:
    name = "tiff"
    description = "TIFF/OME-TIFF/ImageJ/PNG/JPEG; pixel size from metadata or config"
    Options = Options

    @staticmethod
    def build(options: Options, ctx: BuildContext) -> TiffReader:
        return TiffReader(options, ctx.extra.get("experiment", "default"))


PLUGIN = _Spec()
