"""The per-cell table on disk (the cells sink's files), read back as one pandas DataFrame.

The sink (``cellmonitor_plugins.sinks.cells``) writes it; the report, the export and the
benchmarks read it here, in the core, so no layer above the plugins' imports a plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the columns every row has, in order (marker columns follow on frames that carry the marker)
COLUMNS = ("experiment", "well", "field", "timepoint", "acquired_at", "source", "label", "centroid_y_um", "centroid_x_um",
           "area_um2", "class", "state", "certainty", "uncertain", "unknown")
#: the columns tracking adds (monitor.fate.tracking.FieldTracks.frame_columns)
TRACK_COLUMNS = ("track_id", "parent_track_id", "link_timepoint", "link_label")


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
