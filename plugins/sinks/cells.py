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
* Tracks (``[tracking]``, on by default): each frame's cells are linked to
  the field's earlier ones as the frame is written (:mod:`monitor.fate.tracking`),
  and every row carries ``track_id``, ``parent_track_id`` (a daughter's
  mother track) and ``link_timepoint``/``link_label`` (its predecessor). The
  rows are the tracker's state: a restarted service reads a field's files back
  and continues the same tracks, and as both engines record through this sink
  the Ray replay links as the local loop does. A frame that arrives late can
  change the links or ids of later frames: their files are rewritten.
  After each frame the field's tracks are smoothed and ``<state_dir>/fates.sqlite``
  gets its smoothed counts and, with a plate map, the dose response at that
  timepoint (:mod:`monitor.fate.store`; Grafana's smoothed-state and EC50 panels).
* ``cellmonitor export CONFIG --cells OUT.parquet`` gathers every file into one table.
* Never the record of truth: a failure to write is one warning and the
  frame stays counted (the counts CSV is the record).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitor.fate.fates import hmm_params
from monitor.fate.store import FateStore
from monitor.fate.table import COLUMNS, TRACK_COLUMNS, read_cells
from monitor.fate.tracking import FieldTracks, LinkParams
from monitor.intake.ledger import safe_text
from monitor.protocols import SinkBase
from monitor.records import Counts, FrameKey
from monitor.registry import plugin_spec

log = logging.getLogger(__name__)

__all__ = ["COLUMNS", "SMOOTHED_COLUMNS", "TRACK_COLUMNS", "PLUGIN", "CellTableSink", "cell_rows", "kept_rows", "link_params", "read_cells", "rows_frame"]


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

    def __init__(self, folder: Path, fmt: str = "parquet", roles: Mapping[str, str] | None = None,
                 tracking: LinkParams | None = None, store: FateStore | None = None):
        self.folder = folder
        self.path = None  # many files, not one: no gauges are restored from it
        self.fmt = fmt
        self.roles = roles
        self.tracking = tracking
        self._fields: dict[tuple[str, str, str], FieldTracks] = {}
        #: each tracked field's rows by timepoint, only the columns the fates store smooths, as plain
        #: arrays (:func:`kept_rows`), never as the DataFrames written
        self._tables: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
        self.store = store if tracking is not None else None
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def file_for(self, counts: Counts, suffix: str) -> Path:
        """``<folder>/<experiment>/<well>/<field>_t<NNNNN><suffix>`` (names made safe for any file system)."""
        return self.file_for_key(counts.key, suffix)

    def file_for_key(self, k: FrameKey, suffix: str) -> Path:
        """The file of frame ``k`` (see :meth:`file_for`)."""
        return self.folder / _part(k.experiment) / _part(k.well) / f"{_part(k.field)}_t{k.timepoint:05d}{suffix}"

    @property
    def suffixes(self) -> tuple[str, ...]:
        return (".parquet",) if self.fmt == "parquet" else (".csv",) if self.fmt == "csv" else (".parquet", ".csv")

    def write(self, counts: Counts) -> None:
        """Write (or rewrite) the frame's per-cell file(s), atomically; with tracking, link the
        frame first and rewrite the files of the frames whose links or ids it changed."""
        import pandas as pd

        cols = cell_rows(counts, self.roles)
        with self._lock:
            changed: set[int] = set()
            ft = None
            if self.tracking is not None:
                try:
                    ft = self._field(counts.key)
                    if not ft.accepts(counts.key.timepoint):
                        ft = self._reload_field(counts.key)
                    yx = np.column_stack([cols["centroid_y_um"], cols["centroid_x_um"]]) if cols["label"] else np.zeros((0, 2))
                    changed = ft.add(counts.key.timepoint, np.asarray(cols["label"], dtype=np.int64), yx)
                    cols.update(ft.frame_columns(counts.key.timepoint, cols["label"]))
                except Exception as e:  # noqa: BLE001 - the rows are written without tracks, said once per frame
                    log.warning("tracking: %s written without track ids (%s: %s)", counts.key, type(e).__name__, e)
                    ft, changed = None, set()
            df = pd.DataFrame(cols)
            if df.empty:
                df = pd.DataFrame({c: pd.Series(dtype=object) for c in (*COLUMNS, *(TRACK_COLUMNS if ft else ()))})
            self._write_df(df, counts.key)
            if ft is not None:
                k = counts.key
                table = self._tables.setdefault((k.experiment, k.well, k.field), {})
                table[k.timepoint] = kept_rows(df)
                for t in sorted(changed - {k.timepoint}):
                    self._retrack(ft, FrameKey(k.experiment, k.well, k.field, t))
                if self.store is not None:
                    try:
                        # fresh frames every time: a kept DataFrame would gather a dead weak reference in
                        # pandas' copy-on-write bookkeeping at every concat (hundreds per frame kept)
                        parts = [rows_frame(x) for x in table.values() if len(x["label"])] or [df[[c for c in df if c in SMOOTHED_COLUMNS]]]
                        self.store.update(pd.concat(parts, ignore_index=True))
                    except Exception as e:  # noqa: BLE001 - derived numbers never stop the record
                        log.warning("fates store: %s not updated (%s: %s)", k, type(e).__name__, e)
                self._seal(ft, (k.experiment, k.well, k.field))

    def _write_df(self, df: Any, key: FrameKey) -> None:
        for suffix in self.suffixes:
            out = self.file_for_key(key, suffix)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            if suffix == ".parquet":
                df.to_parquet(tmp, index=False)
            else:
                df.to_csv(tmp, index=False)
            os.replace(tmp, out)

    def _read_frame(self, key: FrameKey) -> Any:
        import pandas as pd

        pq, csv = self.file_for_key(key, ".parquet"), self.file_for_key(key, ".csv")
        return pd.read_parquet(pq) if pq.is_file() else pd.read_csv(csv) if csv.is_file() else None

    def _retrack(self, ft: FieldTracks, key: FrameKey) -> None:
        """Rewrite the tracking columns of an earlier frame's file (a late frame changed them)."""
        df = self._read_frame(key)
        if df is None:
            return
        for c, v in ft.frame_columns(key.timepoint, df["label"].astype(int).tolist()).items():
            df[c] = v
        self._write_df(df, key)
        self._tables.setdefault((key.experiment, key.well, key.field), {})[key.timepoint] = kept_rows(df)

    def _seal(self, ft: FieldTracks, fk: tuple[str, str, str]) -> None:
        """Keep only the field's latest ``memory_timepoints`` in memory (tracker and kept rows):
        a run of weeks holds a bounded window, the rest is on disk."""
        keep = self.tracking.memory_timepoints if self.tracking is not None else 0
        if keep <= 0 or not ft.frames:
            return
        keep_from = max(ft.frames) - keep + 1
        if ft.seal(keep_from):
            table = self._tables.get(fk, {})
            for t in [t for t in table if t < keep_from]:
                del table[t]

    def _reload_field(self, key: FrameKey) -> FieldTracks:
        """The field's tracker rebuilt from all its recorded files: a frame older than the window
        in memory arrived, and its links need the frames before it."""
        fk = (key.experiment, key.well, key.field)
        log.info("tracking: %s is older than the %d timepoints %s/%s/%s keeps in memory: its recorded frames are read again",
                 key, self.tracking.memory_timepoints if self.tracking else 0, *fk)
        self._fields.pop(fk, None)
        self._tables.pop(fk, None)
        return self._field(key)

    def _field(self, key: FrameKey) -> FieldTracks:
        """The field's tracker: from memory, or rebuilt from its recorded files (a restart)."""
        fk = (key.experiment, key.well, key.field)
        ft = self._fields.get(fk)
        if ft is None:
            ft = self._load_field(key)
            self._fields[fk] = ft
        return ft

    def _load_field(self, key: FrameKey) -> FieldTracks:
        import pandas as pd

        assert self.tracking is not None
        where = self.folder / _part(key.experiment) / _part(key.well)
        parts = []
        for suffix in self.suffixes:
            for p in sorted(where.glob(f"{_part(key.field)}_t*{suffix}")):
                if suffix == ".csv" and p.with_suffix(".parquet").is_file():
                    continue
                parts.append(pd.read_parquet(p) if suffix == ".parquet" else pd.read_csv(p))
        parts = [x for x in parts if len(x)]
        table = self._tables.setdefault((key.experiment, key.well, key.field), {})
        for x in parts:
            table[int(x["timepoint"].iloc[0])] = kept_rows(x)
        if not parts:
            return FieldTracks(self.tracking)
        df = pd.concat(parts, ignore_index=True)
        if all(c in df for c in TRACK_COLUMNS):
            ft = FieldTracks.from_rows(df["timepoint"], df["label"], df["centroid_y_um"], df["centroid_x_um"],
                                       df["link_timepoint"], df["link_label"], self.tracking)
            log.info("tracks of %s/%s/%s continued from %d recorded frames", key.experiment, key.well, key.field,
                     df["timepoint"].nunique())
            return ft
        # frames recorded before tracking was on: link them now, in timepoint order
        ft = FieldTracks(self.tracking)
        for t, g in df.groupby("timepoint", sort=True):
            ft.add(int(t), g["label"].to_numpy(np.int64), g[["centroid_y_um", "centroid_x_um"]].to_numpy(float))
        for t in sorted(ft.frames):
            self._retrack(ft, FrameKey(key.experiment, key.well, key.field, int(t)))
        return ft


#: the per-cell columns the fates store reads (:meth:`monitor.fate.store.FateStore.update`,
#: :func:`monitor.fate.fates.smooth_cells`): all the sink keeps of a field's earlier frames
SMOOTHED_COLUMNS = ("experiment", "well", "field", "timepoint", "acquired_at", "label", "state", "certainty", "unknown",
                    "track_id", "parent_track_id")


class _Coded:
    """A column of few distinct values (names, states, one time stamp) as codes into them:
    one object per distinct value, not one per cell."""

    __slots__ = ("codes", "values")

    def __init__(self, column: Any):
        import pandas as pd

        codes, values = pd.factorize(column.to_numpy(), use_na_sentinel=False)
        self.codes = codes.astype(np.int32)
        self.values = np.asarray(values, dtype=object)

    def __len__(self) -> int:
        return len(self.codes)

    def array(self) -> np.ndarray:
        return self.values.take(self.codes)


def kept_rows(df: Any) -> dict[str, Any]:
    """What the sink keeps in memory of one frame's rows: the :data:`SMOOTHED_COLUMNS` it has,
    numbers as numpy arrays, text coded (:func:`rows_frame` makes the DataFrame again)."""
    return {c: _Coded(df[c]) if df[c].dtype.kind not in "biuf" else df[c].to_numpy(copy=True) for c in SMOOTHED_COLUMNS if c in df}


def rows_frame(kept: dict[str, Any]) -> Any:
    """The DataFrame of a frame's :func:`kept_rows`."""
    import pandas as pd

    return pd.DataFrame({c: v.array() if isinstance(v, _Coded) else v for c, v in kept.items()})


def _part(s: str) -> str:
    """A name made safe for any file system."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in safe_text(s)) or "_"


def _build(o: Options, ctx: Any) -> CellTableSink:
    params = link_params(ctx.tracking)
    store = None
    if params is not None:
        t = ctx.tracking
        store = FateStore(ctx.state_dir / "fates.sqlite", hmm_params(t), t.interval_h if t is not None else 1.0,
                          t.plate_map if t is not None else None, ctx.metrics)
    return CellTableSink(o.folder or ctx.state_dir / "cells", o.format, ctx.roles, params, store)


def link_params(tracking: Any) -> LinkParams | None:
    """The linking parameters of a ``[tracking]`` table (None: tracking is off)."""
    if tracking is not None and not tracking.enabled:
        return None
    try:
        import laptrack  # noqa: F401
    except ImportError:
        log.warning("tracking is on but laptrack is not installed: per-cell rows carry no track_id (pip install laptrack)")
        return None
    if tracking is None:
        return LinkParams()
    return LinkParams(max_step_um=tracking.max_step_um, max_gap=tracking.max_gap, divisions=tracking.divisions,
                      memory_timepoints=tracking.memory_timepoints)


PLUGIN = plugin_spec(
    "cells", "per-cell table: one row per cell (keys, source file, label, centroid, area, state, certainty, marker) as Parquet/CSV",
    Options, lambda o, ctx: _build(o, ctx),
)
