"""The reader toolkit: what every reader plugin shares, so no reader copies another.

* :func:`choose_pixel_size` -- the pixel-size precedence (metadata vs
  configuration) with the source of the value that won;
* :func:`key_from_match` -- frame identity from a file-name pattern match;
* :func:`guess_role` -- a channel's role from its name, for readers that know
  nothing better (vendor readers declare roles from their metadata);
* (in :mod:`monitor.imageio`) decoding with the cap on a plane's declared
  size, :func:`~monitor.imageio.check_plane_pixels`, and the sane pixel-size
  range.

Readers declare each channel's role (:data:`~monitor.records.ChannelRole`) in
:attr:`~monitor.records.Acquisition.roles`; the assembler picks the segmented
(transmitted) and control (fluorescence) channels from those roles.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from monitor.errors import BadInput
from monitor.imageio import check_pixel_size, trailing_number
from monitor.records import ChannelRole, FrameKey

_TRANSMITTED = re.compile(r"bright|phase|\bri\b|refractive|trans|dic|holo|grey|gray|image|bf\b", re.I)
_MARKER = re.compile(r"apo|\bpi\b|propidium|sytox|annexin|dead|7-?aad|draq7|caspase", re.I)
_NUCLEAR = re.compile(r"hoechst|dapi|nucle|draq5|\bh2b", re.I)
_FLUORESCENCE = re.compile(r"apo|\bpi\b|propidium|fluo|\bfl\d|tritc|texas|rfp|gfp|fitc|cy3|cy5|dapi|red|green|sytox|annexin", re.I)



def well_name(text: str) -> str:
    """``c01`` -> ``C1``, ``AA12`` -> ``AA12``: the form every reader gives a well (upper-case
    row, column without leading zeros); text that is no well stays as it is, stripped."""
    m = re.fullmatch(r"\s*([A-Za-z]{1,2})0*(\d+)\s*", text)
    return f"{m.group(1).upper()}{int(m.group(2))}" if m else text.strip()

def choose_pixel_size(
    path: Path | str,
    from_file: Sequence[tuple[float, str] | None],
    configured: float | None,
    prefer_config: bool,
    option: str,
    missing: str = "no pixel size in the file's metadata and none configured",
) -> tuple[float, str]:
    """The pixel size of a file and where it came from.

    Precedence: the configured value when ``prefer_config`` is set; else the
    first value the file's metadata gives (``from_file``, most trusted first,
    each ``(um_per_px, source)`` or None); else the configured value (source
    ``"config"``).

    Raises
    ------
    BadInput
        Neither the file nor the configuration gives a size (``missing``, then
        the option ``option`` to set), or the chosen value is outside
        0.05..5 um/px.
    """
    candidates: list[tuple[float, str]] = []
    if configured is not None and prefer_config:
        candidates.append((float(configured), "config"))
    candidates += [c for c in from_file if c is not None]
    if configured is not None:
        candidates.append((float(configured), "config"))
    if not candidates:
        raise BadInput(path, f"{missing} (set {option})")
    size, source = candidates[0]
    return check_pixel_size(path, size, source), source


def key_from_match(m: re.Match[str] | None, path: Path | str, experiment: str) -> FrameKey:
    """Frame identity from a match of a pattern with named groups.

    Groups ``experiment``, ``well``, ``field`` and ``timepoint`` are optional:
    absent ones give ``experiment`` (the configured one), well ``"-"``, field
    ``"1"``, and the last number in the file name as the timepoint (0 if none).
    """
    g = m.groupdict() if m is not None else {}
    tp = g.get("timepoint")
    return FrameKey(
        g.get("experiment") or experiment,
        g.get("well") or "-",
        g.get("field") or "1",
        int(tp) if tp is not None else (trailing_number(Path(path).stem) or 0),
    )


def stem_of(path: Path) -> str:
    """A frame file's name without its image suffix (``.ome.tif`` counts as one): what a sidecar
    (``<stem>.json``) or a mask another tool wrote (``<stem>_labelled.tif``) is named after."""
    name = Path(path).name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


def guess_role(name: str) -> ChannelRole | None:
    """The role a channel's name implies: ``transmitted`` (bright field, phase, RI), ``marker`` (a
    death marker: PI, Apo-15, SYTOX, annexin, "dead ..."), ``nuclear`` (Hoechst, DAPI, "... nuclei"),
    ``fluorescence`` (another dye), else None. A dead-cell nuclear dye is a marker."""
    if _TRANSMITTED.search(name):
        return "transmitted"
    if _MARKER.search(name):
        return "marker"
    if _NUCLEAR.search(name):
        return "nuclear"
    if _FLUORESCENCE.search(name):
        return "fluorescence"
    return None
