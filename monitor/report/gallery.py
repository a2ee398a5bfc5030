"""Frames re-read and re-classified for the report: overlays and the per-state gallery.

Policy:

- Per well, ``frames_per_well`` timepoints evenly spread over the run (first
  and last included; the well's first field) are read from the watch folder
  by the names in the CSV's ``sources`` and run through the configured
  pipeline (:func:`monitor.report.cells.call_cells`).
- Each such frame gets a full-size overlay PNG (outlines by state, scale bar,
  legend) written under the report folder; the page shows a thumbnail and
  links the file.
- The run's timepoints are split into up to three ranges (early, middle,
  late); per class and range, up to ``per_state`` cells are drawn at random
  (seeded: the same report twice shows the same cells) from the processed
  frames of that range, spread over the wells.
- A frame whose re-classified counts differ from its CSV row (the index or
  the config changed since it was counted) is reported on the page; a frame
  whose files are gone is skipped and counted.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import CellmonitorError
from monitor.imaging import resize
from monitor.report.cells import call_cells, find_sources, read_frame
from monitor.report.data import Experiment
from monitor.report.overlay import draw_overlay

log = logging.getLogger(__name__)


@dataclass
class FrameView:
    """One re-classified frame: where its overlay is, its thumbnail, and whether it matches the CSV."""

    well: str
    field: str
    timepoint: int
    overlay_path: Path
    thumbnail: np.ndarray
    counts: dict[str, int]
    csv_counts: dict[str, int]

    @property
    def matches(self) -> bool:
        """The re-classified counts equal the CSV's."""
        return self.counts == self.csv_counts


@dataclass
class GalleryCell:
    """One sampled cell: its crop (as the encoders saw it) and its call."""

    well: str
    field: str
    timepoint: int
    cell_id: int
    label: str
    certainty: float
    uncertain: bool
    centroid_yx_px: tuple[float, float]
    crop: np.ndarray
    unknown: bool = False  # unlike every reference (the index's calibrated distance)


@dataclass
class Gallery:
    """What :func:`build_gallery` found: frames, ranges, sampled cells per (class, range), and problems."""

    frames: list[FrameView] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    cells: dict[tuple[str, int], list[GalleryCell]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # frames whose files are gone
    failed: list[str] = field(default_factory=list)  # frames that could not be processed (one line each)
    crop_pixel_size_um: float | None = None


def pick_timepoints(timepoints: list[int], n: int) -> list[int]:
    """``n`` timepoints evenly spread over the sorted list, first and last included (all when fewer)."""
    tps = sorted(set(timepoints))
    if n <= 0 or not tps:
        return []
    if len(tps) <= n:
        return tps
    idx = np.unique(np.round(np.linspace(0, len(tps) - 1, n)).astype(int))
    return [tps[i] for i in idx]


def timepoint_ranges(timepoints: list[int], n: int = 3) -> list[tuple[int, int]]:
    """Up to ``n`` contiguous (first, last) ranges splitting the sorted unique timepoints evenly."""
    tps = sorted(set(timepoints))
    parts = [p for p in np.array_split(np.array(tps, dtype=int), min(n, len(tps))) if len(p)] if tps else []
    return [(int(p[0]), int(p[-1])) for p in parts]


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._") or "x"


def build_gallery(
    e: Experiment,
    cfg: Any,
    pipeline: Any,
    readers: Any,
    overlay_dir: Path,
    frames_per_well: int = 3,
    per_state: int = 8,
    roles: dict[str, str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Gallery:
    """Re-classify the chosen frames, write their overlays into ``overlay_dir``, sample the gallery (module docstring)."""
    from tqdm import tqdm


    g = Gallery()
    rows = e.rows.copy()
    rows["_tp"] = rows["timepoint"].astype(int)
    g.ranges = timepoint_ranges(list(rows["_tp"]))
    chosen = []
    for w in e.wells:
        wr = rows[rows["well"].astype(str) == w]
        first_field = sorted(wr["field"].astype(str).unique())[0]
        wr = wr[wr["field"].astype(str) == first_field]
        for tp in pick_timepoints(list(wr["_tp"]), frames_per_well):
            chosen.append(wr[wr["_tp"] == tp].iloc[-1])
    overlay_dir.mkdir(parents=True, exist_ok=True)
    pool: dict[tuple[str, int], list[GalleryCell]] = {}
    for row in tqdm(chosen, desc=f"report {e.name}: frames", unit="frame", file=sys.stderr, disable=None if progress else True):
        where = f"{row['well']}/{row['field']}/t{row['_tp']}"
        names = [n for n in str(row.get("sources") or "").split(";") if n and n != "nan"]
        paths = find_sources(names, cfg.service.watch_dir, True) if names else None
        if not paths:
            g.missing.append(where)
            continue
        try:
            frame = read_frame(paths, cfg, readers)
            calls = call_cells(frame, pipeline)
        except (CellmonitorError, OSError, ValueError, RuntimeError) as ex:
            g.failed.append(f"{where}: {ex}")
            log.warning("report: frame %s: %s", where, ex)
            continue
        st = calls.states
        img = draw_overlay(
            calls.frame.image, calls.cells.labels, st.predicted, st.classes, calls.frame.pixel_size_um,
            cell_ids=[c.id for c in calls.cells.cells], uncertain=st.uncertain, unknown=st.unknown, roles=roles,
            title=f"{e.name} {where}",
        )
        path = overlay_dir / f"{_safe(str(row['well']))}_f{_safe(str(row['field']))}_t{int(row['_tp']):04d}.png"
        _write_png(path, img)
        h, w = img.shape[:2]
        scale = 360 / max(h, w)
        thumb = resize(img, (max(1, round(h * scale)), max(1, round(w * scale)))) if scale < 1 else img
        csv_counts = {c: int(float(row[f"n_{c}"])) for c in st.classes if f"n_{c}" in row and str(row[f"n_{c}"]) not in ("", "nan")}
        g.frames.append(FrameView(str(row["well"]), str(row["field"]), int(row["_tp"]), path, np.asarray(thumb, np.uint8), calls.counts(), csv_counts))
        if pipeline.crop_framing == "window":
            g.crop_pixel_size_um = calls.frame.pixel_size_um
        rng_i = next((i for i, (a, b) in enumerate(g.ranges) if a <= int(row["_tp"]) <= b), 0)
        for i, c in enumerate(calls.cells.cells):
            gc = GalleryCell(str(row["well"]), str(row["field"]), int(row["_tp"]), c.id, st.label(i), float(st.certainty[i]), bool(st.uncertain[i]),
                             c.centroid_yx_px, calls.crops[i], unknown=bool(st.unknown[i]) if st.unknown is not None else False)
            pool.setdefault((gc.label, rng_i), []).append(gc)
    rng = np.random.default_rng(seed)
    for key, cells in sorted(pool.items()):
        g.cells[key] = _spread_sample(cells, per_state, rng)
    return g


def _spread_sample(cells: list[GalleryCell], n: int, rng: np.random.Generator) -> list[GalleryCell]:
    """Up to ``n`` cells drawn at random, taking from the wells in turn so one well does not fill the row."""
    by_well: dict[str, list[GalleryCell]] = {}
    for c in cells:
        by_well.setdefault(c.well, []).append(c)
    queues = [[lst[i] for i in rng.permutation(len(lst))] for _, lst in sorted(by_well.items())]
    out: list[GalleryCell] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return sorted(out, key=lambda c: (c.well, c.timepoint, c.cell_id))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cannot write PNG")
