"""Per-cell table: one row per classified cell, for the lab's own downstream analysis.

Off by default; a lab turns it on with one table in the config::

    [[sinks]]
    name = "cells"
    options = { format = "parquet" }   # or "csv", or "both"

Policy
------
* Files: one per frame, ``<folder>/<experiment>/<well>/<field>_t<NNNNN>.parquet``
  (and/or ``.csv``), default folder ``<state_dir>/cells``. A frame processed
  again (a restart before its ledger row was written) rewrites the same file:
  every cell is in the table exactly once across restarts, as every frame is
  in the counts CSV once. Each file is written to a temporary name and
  renamed, so a reader never sees half a table.
* Columns: the frame's keys (``experiment``, ``well``, ``field``,
  ``timepoint``), ``acquired_at``, ``source`` (the frame's file(s), ``;``
  between), ``label`` (the cell's id in the segmentation: with the ``masks``
  segmenter the other tool's own label), ``centroid_y_um``/``centroid_x_um``
  (on the frame at the common pixel size), ``area_um2``, ``class`` (the
  reference class), ``state`` (its canonical state: live, apoptotic,
  necrotic, dead, other), ``certainty``, ``uncertain``, ``unknown``, and,
  on frames that carry the death marker (``[marker]`` with ``agreement``),
  ``marker_<channel>`` (its value in background MADs) and ``marker_state``
  (the marker's verdict; empty when within a threshold's margin).
* ``cellmonitor export CONFIG --cells OUT.parquet`` gathers every file into one table.
* Never the record of truth: a failure to write is one warning and the
  frame stays counted (the counts CSV is the record).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitor.intake.ledger import safe_text
from monitor.protocols import SinkBase
from monitor.records import Counts
from monitor.registry import plugin_spec

log = logging.getLogger(__name__)

#: the columns every row has, in order (marker columns follow on frames that carry the marker)
COLUMNS = ("experiment", "well", "field", "timepoint", "acquired_at", "source", "label", "centroid_y_um", "centroid_x_um",
           "area_um2", "class", "state", "certainty", "uncertain", "unknown")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    folder: Path | None = Field(None, description="default: <state_dir>/cells")
    format: Literal["parquet", "csv", "both"] = Field("parquet", description="Parquet (typed, compact), CSV, or both")


def cell_rows(counts: Counts, roles: Mapping[str, str] | None = None) -> dict[str, list[Any]]:
    """The per-cell table of one frame as columns (empty columns when the frame has no cells)."""
    calls = counts.calls
    if calls is None:
        raise ValueError(f"{counts.key}: counts carry no per-cell calls (the pipeline keeps them for a sink that wants_calls)")
    n = len(calls.cell_ids)
    k = counts.key
    px = calls.pixel_size_um
    cen = calls.centroid_yx_px if calls.centroid_yx_px is not None else np.full((n, 2), np.nan)
    names = [calls.classes[int(i)] for i in calls.predicted]
    cols: dict[str, list[Any]] = {
        "experiment": [k.experiment] * n,
        "well": [k.well] * n,
        "field": [k.field] * n,
        "timepoint": [k.timepoint] * n,
        "acquired_at": [counts.acquired_at.isoformat() if counts.acquired_at else None] * n,
        "source": [";".join(map(str, counts.sources))] * n,
        "label": [int(i) for i in calls.cell_ids],
        "centroid_y_um": [float(v) * px for v in cen[:, 0]],
        "centroid_x_um": [float(v) * px for v in cen[:, 1]],
        "area_um2": [float(v) for v in (calls.area_um2 if calls.area_um2 is not None else np.full(n, np.nan))],
        "class": names,
        "state": [(roles or {}).get(c, c) for c in names],
        "certainty": [float(v) for v in (calls.certainty if calls.certainty is not None else np.full(n, np.nan))],
        "uncertain": [bool(v) for v in calls.uncertain],
        "unknown": [bool(v) for v in (calls.unknown if calls.unknown is not None else np.zeros(n, bool))],
    }
    if calls.marker_values is not None and calls.marker_labels is not None:
        for ch, v in calls.marker_values.items():
            cols[f"marker_{ch}"] = [float(x) for x in v]
        cols["marker_state"] = [str(x) for x in calls.marker_labels]
    return cols


class CellTableSink(SinkBase):
    """One Parquet (or CSV) file of per-cell rows per frame (module docstring)."""

    name = "cells"
    record_of_truth = False
    #: the pipeline keeps each cell's call for this sink (monitor.pipeline.Pipeline.keep_calls)
    wants_calls = True

    def __init__(self, folder: Path, fmt: str = "parquet", roles: Mapping[str, str] | None = None):
        self.folder = folder
        self.path = None  # many files, not one: no gauges are restored from it
        self.fmt = fmt
        self.roles = roles
        folder.mkdir(parents=True, exist_ok=True)

    def file_for(self, counts: Counts, suffix: str) -> Path:
        """``<folder>/<experiment>/<well>/<field>_t<NNNNN><suffix>`` (names made safe for any file system)."""
        k = counts.key

        def part(s: str) -> str:
            return "".join(c if c.isalnum() or c in "-_." else "_" for c in safe_text(s)) or "_"

        return self.folder / part(k.experiment) / part(k.well) / f"{part(k.field)}_t{k.timepoint:05d}{suffix}"

    def write(self, counts: Counts) -> None:
        """Write (or rewrite) the frame's per-cell file(s), atomically."""
        import pandas as pd

        df = pd.DataFrame(cell_rows(counts, self.roles))
        if df.empty:
            df = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
        for suffix in ((".parquet",) if self.fmt == "parquet" else (".csv",) if self.fmt == "csv" else (".parquet", ".csv")):
            out = self.file_for(counts, suffix)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            if suffix == ".parquet":
                df.to_parquet(tmp, index=False)
            else:
                df.to_csv(tmp, index=False)
            os.replace(tmp, out)


def read_cells(folder: Path) -> Any:
    """Every frame's per-cell rows under ``folder`` as one pandas DataFrame, in frame order
    (Parquet files; CSV where a frame has no Parquet file)."""
    import pandas as pd

    parts = []
    for p in sorted(folder.rglob("*_t*.parquet")):
        parts.append(pd.read_parquet(p))
    have = {p.with_suffix("") for p in folder.rglob("*_t*.parquet")}
    for p in sorted(folder.rglob("*_t*.csv")):
        if p.with_suffix("") not in have:
            parts.append(pd.read_csv(p))
    if not parts:
        return pd.DataFrame({c: [] for c in COLUMNS})
    df = pd.concat([x for x in parts if len(x)] or parts[:1], ignore_index=True)
    return df.sort_values(["experiment", "well", "field", "timepoint", "label"], kind="stable").reset_index(drop=True)


PLUGIN = plugin_spec(
    "cells", "per-cell table: one row per cell (keys, source file, label, centroid, area, state, certainty, marker) as Parquet/CSV",
    Options, lambda o, ctx: CellTableSink(o.folder or ctx.state_dir / "cells", o.format, ctx.roles),
)
