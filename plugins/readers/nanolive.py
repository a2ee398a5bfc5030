"""Nanolive 3D Cell Explorer (CX-A, EVE/STEVE) TIFF exports.

No public description or sample of these exports exists, so every assumption
is an option:

* Naming: ``pattern`` is a regular expression with named groups
  ``experiment``, ``well``, ``field``, ``timepoint`` and ``channel`` (all
  optional but ``channel``). The default takes
  ``<experiment>_[<well>_][pos<N>_]<channel>_t<NNN>.tif``, for example
  ``HeLa_drugA_A1_pos1_RI_t0003.tif`` or ``HeLa_drugA_A1_pos1_FL1_t0003.tif``,
  where the channel is an RI token (``RI``, ``RI-MIP``, ``RI_Tomogram``,
  ``Refractive Index``) or a fluorescence token (``FL1``..., ``Fluo*`` and
  common dye names). A name that does not match is declined by ``accepts``.
* Channels: a channel whose name matches ``ri_channel`` is refractive index
  and is renamed ``ri_name`` (``"RI"``); ``channel_names`` renames others
  (``{FL1 = "Apo-15"}``). A file with a C axis (ImageJ/OME hyperstack) gives
  one channel per C index, named by ``page_channels``.
* Z-stacks: every axis other than Y, X, C (and S, colour samples) is a Z axis;
  RI stacks are reduced to 2-D by ``projection`` (``max``, ``mean``,
  ``median``, ``min``, ``sum``, ``std``, ``middle``) or a fixed ``z_plane``;
  fluorescence stacks by ``fluorescence_projection``. A file holding more than
  one timepoint (T axis) is refused: the service counts one file per timepoint.
* RI scaling: Nanolive writes RI as uint16 = RI x 10000. ``ri_scale="x10000"``
  always divides integer RI data by 10000 (giving float32 RI around 1.33);
  ``"auto"`` does so only when the bulk of the values (1st..99th percentile)
  lies in 10000..20000 (RI 1.0..2.0); ``"none"`` keeps the raw values.
  Scaling happens before projection, so ``sum``/``mean`` are in RI units.
* Pixel size: files do not carry it reliably, so it comes from
  ``pixel_size_um`` (default 0.19 um/px, the 60x objective; source
  ``"config"``) unless ``use_file_pixel_size`` is set and the file has
  OME/ImageJ/resolution metadata. Always checked against 0.05..5 um/px.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitor.config import Regex
from monitor.errors import BadInput
from monitor.imageio import (
    TIFF_SUFFIXES,
    as_plane,
    read_tiff,
    tiff_pixel_size_um,
)
from monitor.protocols import ReaderBase
from monitor.readkit import choose_pixel_size, key_from_match
from monitor.records import Acquisition, ChannelRole
from monitor.registry import plugin_spec

log = logging.getLogger(__name__)

_RI_TOKEN = r"RI(?:[ _-]?(?:MIP|Tomogram|Tomo|stack|2D|3D|projection))*|Refractive[ _-]?Index"
_FL_TOKEN = r"FL\d+|Fluo\w*|DAPI|FITC|GFP|TRITC|RFP|mCherry|Cy[35]|Apo-?15|PI|SYTOX\w*|Annexin\w*"
DEFAULT_PATTERN = (
    r"^(?:(?P<experiment>.+?)_)?(?:(?P<well>[A-Z]{1,2}\d{1,3})_)?(?:(?:pos|p|field|f)(?P<field>\d+)_)?"
    rf"(?P<channel>{_RI_TOKEN}|{_FL_TOKEN})_t(?P<timepoint>\d+)(?:\.ome)?\.tiff?$"
)
DEFAULT_RI_CHANNEL = r"^(?:RI|Refractive[ _-]?Index)(?![A-Za-z])"

Projection = Literal["max", "mean", "median", "min", "sum", "std", "middle"]


def project(stack: np.ndarray, how: str, z_plane: int | None = None) -> np.ndarray:
    """Reduce a (Z, Y, X) stack to (Y, X).

    ``max``/``min``/``middle``/``z_plane`` keep the dtype; ``mean``, ``median``,
    ``std`` and ``sum`` give float32 (``sum`` accumulates in float64, so uint16
    stacks cannot overflow). A 2-D input is returned unchanged.
    """
    if stack.ndim == 2:
        return stack
    if z_plane is not None:
        if not 0 <= z_plane < stack.shape[0]:
            raise ValueError(f"z_plane {z_plane} outside the stack's {stack.shape[0]} planes")
        return stack[z_plane]
    if how == "max":
        return stack.max(axis=0)
    if how == "min":
        return stack.min(axis=0)
    if how == "middle":
        return stack[stack.shape[0] // 2]
    if how == "mean":
        return stack.mean(axis=0, dtype=np.float64).astype(np.float32)
    if how == "median":
        return np.median(stack, axis=0).astype(np.float32)
    if how == "std":
        return stack.std(axis=0, dtype=np.float64).astype(np.float32)
    if how == "sum":
        return stack.sum(axis=0, dtype=np.float64).astype(np.float32)
    raise ValueError(f"unknown projection {how!r}")


def scale_ri(stack: np.ndarray, mode: str) -> tuple[np.ndarray, bool]:
    """Apply the RI scaling policy (module docstring); returns (array, scaled?)."""
    if mode == "none" or stack.dtype.kind not in "ui":
        return stack, False
    if mode == "auto":
        sample = stack.reshape(-1)[:: max(1, stack.size // 200_000)]
        lo, hi = np.percentile(sample, [1, 99])
        if not (10_000 <= lo and hi <= 20_000):
            return stack, False
    return (stack.astype(np.float32) / np.float32(10_000.0)), True


class Options(BaseModel):
    """Options of the Nanolive reader (``[readers.nanolive]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pixel_size_um: float = Field(0.19, gt=0, description="um/px (60x objective: 0.19)")
    use_file_pixel_size: bool = Field(False, description="trust OME/ImageJ/resolution metadata when present")
    pattern: Regex = Field(DEFAULT_PATTERN, description="file-name regex; groups experiment/well/field/timepoint/channel")
    ri_channel: Regex = Field(DEFAULT_RI_CHANNEL, description="regex: channels that hold refractive index")
    ri_name: str = Field("RI", min_length=1, description="name given to the RI channel")
    ri_scale: Literal["auto", "x10000", "none"] = "auto"
    projection: Projection = "max"
    z_plane: int | None = Field(None, ge=0, description="take this Z plane of RI stacks instead of projecting")
    fluorescence_projection: Projection = "max"
    channel_names: dict[str, str] = Field(default_factory=dict, description="rename channels, e.g. {FL1 = 'Apo-15'}")
    page_channels: list[str] = Field(default_factory=list, description="names of the C indexes of multi-channel files")
    instrument: str = Field("nanolive", min_length=1)
    experiment: str | None = Field(None, min_length=1, description="fixed experiment name instead of the name's group")


class NanoliveReader(ReaderBase):
    """Reads one Nanolive TIFF export; see the module docstring for the policies."""

    name = "nanolive"
    specificity = 5

    def __init__(self, options: Options, experiment: str = "default"):
        self.o = options
        self.rx = re.compile(options.pattern, re.I)
        self.ri_rx = re.compile(options.ri_channel, re.I)
        self.experiment = experiment

    def accepts(self, path: Path) -> str | None:
        """Take a TIFF whose name matches ``pattern``."""
        path = Path(path)
        if path.suffix.lower() not in TIFF_SUFFIXES:
            return f"suffix {path.suffix or '(none)'} is not a TIFF"
        if not self.rx.match(path.name):
            return "name does not match readers.nanolive.pattern (<experiment>_[<well>_][pos<N>_]<RI|FLn>_t<NNN>.tif)"
        return None

    def _name(self, raw: str) -> tuple[str, bool]:
        """(channel name after renaming, is it RI?)"""
        if self.ri_rx.search(raw):
            return self.o.ri_name, True
        renamed = self.o.channel_names.get(raw, raw)
        return renamed, bool(self.ri_rx.search(renamed)) or renamed == self.o.ri_name

    def read(self, path: Path) -> Acquisition:
        """Decode, split channels, scale RI, project stacks; NotReady/BadInput as one line."""
        path = Path(path)
        m = self.rx.match(path.name)
        if m is None:
            raise BadInput(path, "name does not match readers.nanolive.pattern")
        g = m.groupdict()
        content = read_tiff(path)
        stacks = self._stacks(path, content)
        raw_channel = (g.get("channel") or "image").strip()
        if len(stacks) == 1:
            raw_names = [raw_channel]
        else:
            given = list(self.o.page_channels)
            raw_names = given[: len(stacks)] + [f"{raw_channel} C{i}" for i in range(len(given), len(stacks))]

        channels: dict[str, np.ndarray] = {}
        roles: dict[str, ChannelRole] = {}
        meta: dict[str, str] = {"channel_file": raw_channel}
        for raw, stack in zip(raw_names, stacks, strict=True):
            name, is_ri = self._name(raw)
            n_z = stack.shape[0] if stack.ndim == 3 and stack.shape[-1] not in (3, 4) else 1
            if is_ri:
                stack, scaled = scale_ri(stack, self.o.ri_scale)
                try:
                    img = project(stack, self.o.projection, self.o.z_plane) if n_z > 1 else stack.reshape(stack.shape[-2:])
                except ValueError as e:
                    raise BadInput(path, f"channel {name!r}: {e}") from None
                meta["ri_scaled"] = "x10000" if scaled else "none"
                meta["ri_projection"] = (f"z_plane {self.o.z_plane}" if self.o.z_plane is not None else self.o.projection) if n_z > 1 else "none (2-D)"
                if img.size:
                    lo, hi = np.percentile(img[:: max(1, img.shape[0] // 256)], [1, 99])
                    meta["ri_range"] = f"{lo:.4f}..{hi:.4f}"
            else:
                img = project(stack, self.o.fluorescence_projection) if n_z > 1 else stack
            meta[f"{name}.z_planes"] = str(n_z)
            channels[name] = as_plane(path, name, img)
            roles[name] = "transmitted" if is_ri else "fluorescence"

        from_file = [tiff_pixel_size_um(content)] if self.o.use_file_pixel_size else []
        size, source = choose_pixel_size(path, from_file, self.o.pixel_size_um, False, "readers.nanolive.pixel_size_um")
        key = key_from_match(m, path, self.experiment)
        if self.o.experiment:  # a fixed experiment name beats the file name's group
            key = replace(key, experiment=self.o.experiment)
        return Acquisition(path, key, channels, size, source, self.o.instrument, metadata=meta, roles=roles)

    def _stacks(self, path: Path, content: object) -> list[np.ndarray]:
        """One (Z, Y, X) / (Y, X) / (Y, X, 3) array per channel of the file."""
        pages: list[np.ndarray] = content.pages  # type: ignore[attr-defined]
        arr: np.ndarray | None = content.series  # type: ignore[attr-defined]
        axes: str = content.axes  # type: ignore[attr-defined]
        if arr is None or not axes or len(axes) != arr.ndim:
            if len(pages) == 1:
                return [pages[0]]
            if any(p.shape != pages[0].shape for p in pages):
                raise BadInput(path, f"{len(pages)} pages of different shapes; expected a Z-stack")
            arr, axes = np.stack(pages), "Z" + "YXS"[: pages[0].ndim]
        if "T" in axes and arr.shape[axes.index("T")] > 1:
            raise BadInput(path, f"holds {arr.shape[axes.index('T')]} timepoints; export one file per timepoint")
        if "S" in axes:  # colour snapshot: no stack to reduce
            return [as_plane(path, "image", arr)]
        if "C" in axes and arr.shape[axes.index("C")] > 1:
            c = axes.index("C")
            per = [np.take(arr, i, axis=c) for i in range(arr.shape[c])]
            rest = axes[:c] + axes[c + 1:]
            return [p.reshape((-1,) + p.shape[rest.index("Y"):]) for p in per]
        y = axes.index("Y")
        return [arr.reshape((-1,) + arr.shape[y:])]


PLUGIN = plugin_spec(
    "nanolive", "Nanolive 3D Cell Explorer TIFF exports: RI (2-D or projected Z-stack) + fluorescence", Options,
    lambda o, ctx: NanoliveReader(o, ctx.experiment),
)
