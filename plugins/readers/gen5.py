"""BioTek Gen5 image exports (Lionheart FX, Cytation).

File names
----------
Gen5 names each exported image
``<Well>[ROI<r>]_<ReadStep>_<n>_<Field>[Z<z>]_<Channel Name>_[T]<NNN>.tif``,
for example ``A1_03_1_1_Bright Field_001.tif``: ``n`` is the channel's index
in the read step, ``NNN`` the kinetic timepoint. Variants handled:

=================  ==============================================
``standard``       ``A1_03_1_1_Bright Field_001.tif`` (also ``_T001``)
``z``              ``C01_06_1_1Z0_Bright Field_001.tif``
``roi``            ``A1ROI1_03_1_1_Bright Field_001.tif``
``explicit``       ``B2_02_SP10Z10_C1_Bright Field_T001.tif`` (SP = field)
=================  ==============================================

The read step may be ``-1``. Channel names hold spaces, brackets and even
underscores (``Bright_Field``, ``Tsf[Phase Contrast]``), so the name is never
split on ``_``: the channel is everything between the field token and the
trailing timepoint. Wells are normalised (``C01`` -> ``C1``). A negative
timepoint (Gen5's "no kinetic loop") counts as 0.

Plate folders look like ``241128_111010_Plate 1`` (date, time, plate name);
the folder name (parent or grandparent of the file) is the experiment, else
``experiment`` from the options, else the service's experiment.

Metadata
--------
Every page carries ``<BTIImageMetaData>`` in TIFF tag 270; OME-TIFF exports
carry the same document inside an ``XMLAnnotation``. It is parsed with
defusedxml and DTDs forbidden, so an entity-expansion bomb is refused with
one line. From it: plate, well, acquisition time (``Date`` ``MM/dd/yy`` +
``Time`` ``HH:mm:ss``), objective, numerical aperture, exposure, gain, LED,
temperature, channel name (``Color="<name> <ex>,<em>"``, possibly wrapped as
``Stitched[...]``) and excitation/emission.

Pixel-size policy: ``ImageWidthMicrons / PixelWidth`` (source
``metadata:gen5``); when the stored image is narrower or wider than
``PixelWidth`` (a binned or resized export) the field of view still spans
``ImageWidthMicrons``, so the stored width is used instead and the note is kept
in the metadata. Without the XML: the file's OME/ImageJ/resolution metadata,
then ``pixel_size_um`` from the options (source ``config``), else a one-line
error. ``prefer_config_pixel_size`` puts the configured value first. Every
value is checked against 0.05..5 um/px.

Z-stacks: with ``z_plane`` set, files of other planes are declined by
``accepts``; without it every plane is read and its channel is named
``"<Channel> Z<z>"`` so planes never overwrite each other in a frame.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import BadInput
from monitor.imageio import (
    TIFF_SUFFIXES,
    as_plane,
    head_contains,
    local_name,
    parse_xml_safely,
    read_tiff,
    tiff_pixel_size_um,
    trailing_number,
)
from monitor.protocols import ReaderBase
from monitor.readkit import choose_pixel_size, guess_role, well_name
from monitor.records import Acquisition, ChannelRole, FrameKey, channel_key
from monitor.registry import plugin_spec

log = logging.getLogger(__name__)

BTI_MAGIC = b"BTIImageMetaData"
SNIFF_BYTES = 65536

_WELL = r"(?P<well>[A-Za-z]{1,2}\d{1,3})(?:ROI(?P<roi>\d+))?"
_END = r"(?:\.ome)?\.tiff?$"
_NAME_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "explicit",
        re.compile(
            rf"^{_WELL}_(?P<step>-?\d+)_SP(?P<field>\d+)(?:Z(?P<z>\d+))?_C(?P<n>\d+)_(?P<channel>.+)_T(?P<t>-?\d+){_END}",
            re.I,
        ),
    ),
    (
        "standard",
        re.compile(
            rf"^{_WELL}_(?P<step>-?\d+)_(?P<n>\d+)_(?P<field>\d+)(?:Z(?P<z>\d+))?_(?P<channel>.+)_T?(?P<t>-?\d+){_END}",
            re.I,
        ),
    ),
)
_PLATE_FOLDER = re.compile(r"^(?P<date>\d{6})_(?P<time>\d{6})_(?P<plate>.+)$")
_COLOR = re.compile(
    r"^\s*(?:(?P<wrap>[A-Za-z][A-Za-z ]*)\[)?\s*(?P<name>.*?)"
    r"(?:\s+(?P<ex>\d+(?:\.\d+)?)\s*,\s*(?P<em>\d+(?:\.\d+)?))?\s*\]?\s*$"
)
_DATE_FORMATS = ("%m/%d/%y %H:%M:%S", "%m/%d/%Y %H:%M:%S", "%m/%d/%y %I:%M:%S %p", "%m/%d/%Y %I:%M:%S %p")


@dataclass(frozen=True)
class Gen5Name:
    """What a Gen5 export file name says; see the module docstring for the variants."""

    well: str
    read_step: int
    channel_index: int
    field: int
    roi: int | None
    z: int | None
    channel: str
    timepoint: int
    variant: str

    @property
    def field_id(self) -> str:
        """Field label of the frame key: ``"2"``, or ``"ROI1-2"`` for a region of interest."""
        return f"ROI{self.roi}-{self.field}" if self.roi is not None else str(self.field)


def parse_gen5_name(name: str) -> Gen5Name | None:
    """Parse a Gen5 export file name (no folder); None when it does not follow the naming.

    The channel is whatever lies between the field token and the trailing
    timepoint, so spaces, brackets and underscores inside it survive.
    """
    for variant, rx in _NAME_PATTERNS:
        m = rx.match(name)
        if not m:
            continue
        g = m.groupdict()
        channel = g["channel"].strip()
        if not channel:
            return None
        roi = int(g["roi"]) if g.get("roi") else None
        z = int(g["z"]) if g.get("z") is not None else None
        if variant == "standard":
            variant = "roi" if roi is not None else "z" if z is not None else "standard"
        return Gen5Name(
            well=well_name(g["well"]),
            read_step=int(g["step"]),
            channel_index=int(g["n"]),
            field=int(g["field"]),
            roi=roi,
            z=z,
            channel=channel,
            timepoint=max(0, int(g["t"])),
            variant=variant,
        )
    return None


def plate_folder(path: Path) -> tuple[str, str, datetime | None] | None:
    """(folder name, plate name, start time) of the Gen5 plate folder holding ``path``.

    The parent is tried, then the grandparent (exports with one sub-folder
    per well). Folder ``241128_111010_Plate 1`` gives
    ``("241128_111010_Plate 1", "Plate 1", 2024-11-28 11:10:10)``.
    """
    for folder in (path.parent, path.parent.parent):
        m = _PLATE_FOLDER.match(folder.name)
        if m:
            try:
                started: datetime | None = datetime.strptime(m["date"] + m["time"], "%y%m%d%H%M%S")
            except ValueError:
                started = None
            return folder.name, m["plate"].strip(), started
    return None


def parse_gen5_datetime(date: str | None, time: str | None) -> datetime | None:
    """``Date`` ``MM/dd/yy`` and ``Time`` ``HH:mm:ss`` (or ``Time`` holding both) -> datetime.

    Gen5 writes the instrument PC's local time without a zone, so the result
    is naive. Unparseable values give None (the frame is still processed).
    """
    candidates = []
    if date and time:
        candidates.append(f"{date.strip()} {time.strip()}")
    for v in (time, date):
        if v:
            candidates.append(v.strip())
    for text in candidates:
        for fmt in _DATE_FORMATS:
            try:
                return datetime.strptime(text, fmt)
            except ValueError:
                continue
    return None


@dataclass(frozen=True)
class Gen5Meta:
    """The fields of one ``<BTIImageMetaData>`` document that this service uses."""

    plate: str | None = None
    well: str | None = None
    acquired_at: datetime | None = None
    read_step: int | None = None
    z_position: str | None = None
    original_filename: str | None = None
    objective: str | None = None
    numerical_aperture: float | None = None
    pixel_width: int | None = None
    pixel_height: int | None = None
    width_um: float | None = None
    height_um: float | None = None
    exposure_ms: float | None = None
    gain: float | None = None
    led_intensity: float | None = None
    temperature_c: float | None = None
    channel_name: str | None = None
    channel_color: str | None = None
    excitation_nm: float | None = None
    emission_nm: float | None = None
    transmitted: bool | None = None
    gen5_version: str | None = None
    camera_model: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def pixel_size_um(self, stored_width_px: int | None = None) -> tuple[float, str] | None:
        """(um/px, note): ``ImageWidthMicrons / PixelWidth``, or / the stored width if it differs."""
        if not self.width_um or self.width_um <= 0:
            return None
        if stored_width_px and self.pixel_width and stored_width_px != self.pixel_width:
            return self.width_um / stored_width_px, (
                f"stored width {stored_width_px} px differs from PixelWidth {self.pixel_width}; "
                f"used ImageWidthMicrons / stored width"
            )
        if self.pixel_width and self.pixel_width > 0:
            return self.width_um / self.pixel_width, ""
        if stored_width_px:
            return self.width_um / stored_width_px, "no PixelWidth; used ImageWidthMicrons / stored width"
        return None

    def as_metadata(self) -> dict[str, str]:
        """Flat string map for :attr:`Acquisition.metadata` (absent values left out)."""
        out: dict[str, str] = {}
        for k in (
            "plate", "objective", "numerical_aperture", "exposure_ms", "gain", "led_intensity",
            "temperature_c", "channel_color", "excitation_nm", "emission_nm", "transmitted",
            "gen5_version", "camera_model", "original_filename", "z_position",
        ):
            v = getattr(self, k)
            if v is None:
                continue
            if k == "objective":
                v = f"{v}x"
            elif isinstance(v, float):
                v = f"{v:g}"
            out[k] = str(v)
        if self.well:
            out["well_xml"] = self.well
        if self.channel_name:
            out["channel_xml"] = self.channel_name
        if self.pixel_width and self.pixel_height:
            out["image_px"] = f"{self.pixel_width}x{self.pixel_height}"
        if self.width_um and self.height_um:
            out["image_um"] = f"{self.width_um:g}x{self.height_um:g}"
        out.update(self.extra)
        return out


def _child(el: Any, path: str) -> Any:
    """First descendant along ``a/b/c`` by local name (namespaces ignored)."""
    cur = el
    for part in path.split("/"):
        if cur is None:
            return None
        cur = next((c for c in cur if local_name(c.tag) == part), None)
    return cur


def _text(el: Any, path: str) -> str | None:
    c = _child(el, path)
    if c is None or c.text is None:
        return None
    t = c.text.strip()
    return t or None


def _float(v: str | None) -> float | None:
    if v is None:
        return None
    try:
        return float(v.replace(",", "."))
    except ValueError:
        return None


def _int(v: str | None) -> int | None:
    f = _float(v)
    return int(f) if f is not None else None


def _bool(v: str | None) -> bool | None:
    return None if v is None else v.strip().lower() in ("true", "1", "yes")


def parse_channel_color(color: str) -> tuple[str | None, float | None, float | None]:
    """``"DAPI 377,447"`` / ``"Stitched[DAPI 377,447]"`` / ``"Bright Field"`` -> (name, ex, em)."""
    m = _COLOR.match(color)
    if not m:
        return color.strip() or None, None, None
    name = m["name"].strip() or None
    return name, _float(m["ex"]), _float(m["em"])


def _meta_from_element(root: Any) -> Gen5Meta:
    ref = _child(root, "ImageReference")
    acq = _child(root, "ImageAcquisition")
    chan = _child(acq, "Channel") if acq is not None else None
    name = ex = em = None
    color = None
    transmitted = None
    if chan is not None:
        color = chan.attrib.get("Color")
        if color:
            name, ex, em = parse_channel_color(color)
        ex = _float(_text(chan, "ExcitationWavelength")) or ex
        em = _float(_text(chan, "EmissionWavelength")) or em
        bf, pc = _bool(_text(chan, "BrightField")), _bool(_text(chan, "PhaseContrast"))
        transmitted = None if bf is None and pc is None else bool(bf or pc)
    if transmitted is None and acq is not None:
        transmitted = _bool(_text(acq, "ColorBrightField"))
    return Gen5Meta(
        plate=_text(ref, "Plate") if ref is not None else None,
        well=well_name(w) if ref is not None and (w := _text(ref, "Well")) else None,
        acquired_at=parse_gen5_datetime(_text(ref, "Date"), _text(ref, "Time")) if ref is not None else None,
        read_step=_int(_text(ref, "ReadStepIndex")) if ref is not None else None,
        z_position=_text(ref, "ZStackPosition") if ref is not None else None,
        original_filename=_text(ref, "OriginalFilename") if ref is not None else None,
        objective=_text(acq, "ObjectiveSize") if acq is not None else None,
        numerical_aperture=_float(_text(acq, "NumericalAperture")) if acq is not None else None,
        pixel_width=_int(_text(acq, "PixelWidth")) if acq is not None else None,
        pixel_height=_int(_text(acq, "PixelHeight")) if acq is not None else None,
        width_um=_float(_text(acq, "ImageWidthMicrons")) if acq is not None else None,
        height_um=_float(_text(acq, "ImageHeightMicrons")) if acq is not None else None,
        exposure_ms=_float(_text(acq, "ShutterSpeedMS")) if acq is not None else None,
        gain=_float(_text(acq, "CameraGain")) if acq is not None else None,
        led_intensity=_float(_text(acq, "LEDIntensity")) if acq is not None else None,
        temperature_c=_float(_text(acq, "Temperature/Value")) if acq is not None else None,
        channel_name=name,
        channel_color=color,
        excitation_nm=ex,
        emission_nm=em,
        transmitted=transmitted,
        gen5_version=_text(root, "System/Gen5/Version"),
        camera_model=_text(root, "System/Camera/Model"),
    )


def parse_bti_xml(text: str) -> list[Gen5Meta]:
    """Every ``<BTIImageMetaData>`` document in ``text`` (the root, or inside an OME XMLAnnotation).

    Raises ``ValueError`` (one line) for malformed XML or XML with a DTD or
    entities; returns ``[]`` when the text holds no BTI document.
    """
    root = parse_xml_safely(text)
    if local_name(root.tag) == "BTIImageMetaData":
        return [_meta_from_element(root)]
    return [_meta_from_element(el) for el in root.iter() if local_name(el.tag) == "BTIImageMetaData"]


class Options(BaseModel):
    """Options of the Gen5 reader (``[readers.gen5]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pixel_size_um: float | None = Field(
        None, gt=0, description="used when a file carries no BTIImageMetaData (or with prefer_config_pixel_size)"
    )
    prefer_config_pixel_size: bool = Field(False, description="configured pixel size wins over the file's XML")
    instrument: str = Field("gen5", min_length=1, description="instrument label (e.g. lionheart, cytation)")
    experiment: str | None = Field(None, min_length=1, description="fixed experiment name instead of the plate folder")
    z_plane: int | None = Field(None, ge=0, description="only this Z plane of Z-stack exports; None reads every plane")
    unrecognised_names: Literal["quarantine", "accept"] = Field(
        "quarantine", description="a file whose name is not Gen5's naming (a copy such as 'name (1).tif'): quarantined, "
        "or accepted with the well from its XML and the name's last number as the timepoint")


class Gen5Reader(ReaderBase):
    """Reads one Gen5 export TIFF; see the module docstring for naming and metadata policy."""

    name = "gen5"
    specificity = 10

    def __init__(self, options: Options, experiment: str = "default"):
        self.o = options
        self.experiment = experiment

    def accepts(self, path: Path) -> str | None:
        """Take a TIFF named like a Gen5 export, or one whose first 64 KiB hold ``BTIImageMetaData``."""
        path = Path(path)
        if path.suffix.lower() not in TIFF_SUFFIXES:
            return f"suffix {path.suffix or '(none)'} is not a TIFF"
        parsed = parse_gen5_name(path.name)
        if parsed is not None:
            if self.o.z_plane is not None and parsed.z is not None and parsed.z != self.o.z_plane:
                return f"Z plane {parsed.z} is not the configured readers.gen5.z_plane {self.o.z_plane}"
            return None
        if head_contains(path, BTI_MAGIC, SNIFF_BYTES):
            return None
        return (
            "name is not a Gen5 export (<Well>_<ReadStep>_<n>_<Field>_<Channel>_<NNN>.tif) "
            "and no BTIImageMetaData in the first 64 KiB"
        )

    def _metas(self, path: Path, descriptions: list[str | None], ome_xml: str | None) -> list[Gen5Meta | None]:
        """One entry per page (None where that page has no BTI document)."""
        out: list[Gen5Meta | None] = []
        shared: list[Gen5Meta] = []
        texts: list[str | None] = list(descriptions) or [None]
        if ome_xml and all(ome_xml != d for d in texts):
            texts = [ome_xml, *texts[1:]]
        for i, text in enumerate(texts):
            if not text or "BTIImageMetaData" not in text:
                out.append(None)
                continue
            try:
                docs = parse_bti_xml(text)
            except ValueError as e:
                raise BadInput(path, f"Gen5 metadata (tag 270, page {i}): {e}") from None
            if len(docs) > 1 and i == 0:  # OME: one annotation per channel, all on page 0
                shared = docs
            out.append(docs[0] if docs else None)
        if shared:
            out = [shared[i] if i < len(shared) else o for i, o in enumerate(out)]
            out += shared[len(out):]
        return out

    def read(self, path: Path) -> Acquisition:
        """Decode a Gen5 export; raises NotReady (truncated) or BadInput (one line)."""
        path = Path(path)
        parsed = parse_gen5_name(path.name)
        content = read_tiff(path)
        pages = content.pages
        metas = self._metas(path, content.descriptions, content.ome_xml)
        metas = (metas + [None] * len(pages))[: len(pages)]
        first = next((m for m in metas if m is not None), None)

        planes = [as_plane(path, f"page{i}", p) for i, p in enumerate(pages)]
        size, source, note = self._pixel_size(path, first, planes[0].shape[1], content)

        channels = self._channel_names(parsed, metas, len(planes))
        meta: dict[str, str] = first.as_metadata() if first is not None else {"bti_xml": "absent"}
        if note:
            meta["pixel_size_note"] = note

        folder = plate_folder(path)
        experiment = self.o.experiment or (folder[0] if folder else None) or self.experiment
        if folder:
            meta["plate_folder"] = folder[0]
            meta.setdefault("plate", folder[1])
            if folder[2]:
                meta["plate_started"] = folder[2].isoformat()
        if parsed is not None:
            well, field_id, tp = parsed.well, parsed.field_id, parsed.timepoint
            meta.update(
                name_variant=parsed.variant,
                read_step=str(parsed.read_step),
                channel_index=str(parsed.channel_index),
            )
            if parsed.z is not None:
                meta["z"] = str(parsed.z)
            if parsed.roi is not None:
                meta["roi"] = str(parsed.roi)
            if first is not None and first.well and first.well != well:
                log.warning("%s: well %s in the name but %s in the Gen5 XML; using the name", path, well, first.well)
                meta["well_mismatch"] = f"name {well}, xml {first.well}"
            xml_channel = first.channel_name if first is not None else None
            if len(planes) == 1 and xml_channel and channel_key(xml_channel) != channel_key(parsed.channel):
                log.warning("%s: channel %r in the name but %r in the Gen5 XML; using the name (the assembly matches channels by it)",
                            path, parsed.channel, xml_channel)
                meta["channel_mismatch"] = f"name {parsed.channel}, xml {xml_channel}"
        else:
            if self.o.unrecognised_names == "quarantine":
                raise BadInput(path, "the name is not Gen5's export naming (<well>_<step>_<n>_<field>_<channel>_<t>.tif; a copy "
                                     "such as 'name (1).tif'?): its timepoint would be guessed; rename it, or set "
                                     "readers.gen5.unrecognised_names = \"accept\"")
            well = first.well if first is not None and first.well else "-"
            field_id = "1"
            tp = trailing_number(path.stem) or 0
            meta["name_variant"] = "unrecognised"
        key = FrameKey(experiment, well, field_id, tp)
        return Acquisition(
            path=path,
            key=key,
            roles=self._roles(channels, metas),
            channels=dict(zip(channels, planes, strict=True)),
            pixel_size_um=size,
            pixel_size_source=source,
            instrument=self.o.instrument,
            acquired_at=first.acquired_at if first is not None else None,
            metadata=meta,
        )

    def _pixel_size(self, path: Path, meta: Gen5Meta | None, width_px: int, content: Any) -> tuple[float, str, str]:
        """(um/px, source, note): the Gen5 XML, then other TIFF metadata, then the config (readkit policy)."""
        got = meta.pixel_size_um(width_px) if meta is not None else None
        note = got[1] if got is not None else ""
        candidates = [(got[0], "metadata:gen5") if got is not None else None, tiff_pixel_size_um(content)]
        why = "no ImageWidthMicrons in the Gen5 XML" if meta is not None else "no <BTIImageMetaData> XML in TIFF tag 270"
        size, source = choose_pixel_size(path, candidates, self.o.pixel_size_um, self.o.prefer_config_pixel_size,
                                         "readers.gen5.pixel_size_um", f"{why} and no pixel size configured")
        if source == "metadata:gen5" and note:
            log.info("%s: %s", path, note)
        return size, source, note if source == "metadata:gen5" else ""

    @staticmethod
    def _roles(names: list[str], metas: list[Gen5Meta | None]) -> dict[str, ChannelRole]:
        """Each channel's role from its XML (BrightField/PhaseContrast, else an excitation
        wavelength means fluorescence); from its name where the XML is silent."""
        roles: dict[str, ChannelRole] = {}
        for i, name in enumerate(names):
            m = metas[i] if i < len(metas) else None
            if m is not None and m.transmitted is not None:
                roles[name] = "transmitted" if m.transmitted else "fluorescence"
            elif m is not None and m.excitation_nm:
                roles[name] = "fluorescence"
            elif (r := guess_role(name)) is not None:
                roles[name] = r
        return roles

    def _channel_names(self, parsed: Gen5Name | None, metas: list[Gen5Meta | None], n: int) -> list[str]:
        xml_names = [m.channel_name if m is not None else None for m in metas]
        if n == 1:
            base = parsed.channel if parsed is not None else (xml_names[0] or "image")
            names = [base]
        elif all(xml_names) and len(set(xml_names)) == n:
            names = [str(x) for x in xml_names]
        else:
            stem = parsed.channel if parsed is not None else "page"
            names = [f"{stem} {i}" if parsed is not None else f"page{i}" for i in range(n)]
        if parsed is not None and parsed.z is not None and self.o.z_plane is None:
            names = [f"{nm} Z{parsed.z}" for nm in names]
        return names


PLUGIN = plugin_spec(
    "gen5", "BioTek Gen5 exports (Lionheart FX, Cytation): naming, plate folders, BTIImageMetaData XML", Options,
    lambda o, ctx: Gen5Reader(o, ctx.experiment),
)
