"""How counts become rows: one schema for the CSV sink, the export and the demo table."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from monitor.records import Counts

COLUMNS_FIXED = [
    "experiment", "well", "field", "timepoint", "acquired_at", "processed_at", "instrument",
    "pixel_size_um", "pixel_size_source", "n_cells",
]


def counts_row(c: Counts) -> dict[str, Any]:
    """Flat row: fixed identity columns, ``n_<state>`` and ``frac_<state>`` per class, control signal."""
    row: dict[str, Any] = {
        "experiment": c.key.experiment,
        "well": c.key.well,
        "field": c.key.field,
        "timepoint": c.key.timepoint,
        "acquired_at": c.acquired_at.isoformat() if c.acquired_at else "",
        "processed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "instrument": c.instrument,
        "pixel_size_um": f"{c.pixel_size_um:.4f}",
        "pixel_size_source": c.pixel_size_source,
        "n_cells": c.n_cells,
    }
    for state, n in c.counts.items():
        row[f"n_{state}"] = n
    for state in c.counts:
        row[f"frac_{state}"] = f"{c.fraction(state):.4f}"
    row["n_uncertain"] = c.n_uncertain
    row["mean_certainty"] = "" if math.isnan(c.mean_certainty) else f"{c.mean_certainty:.4f}"
    ctl = c.control
    row["control_channel"] = ctl.channel if ctl else ""
    row["control_area_um2"] = f"{ctl.area_um2:.2f}" if ctl else ""
    row["control_area_fraction"] = f"{ctl.area_fraction:.5f}" if ctl else ""
    row["control_regions"] = ctl.n_regions if ctl else ""
    row["missing_channels"] = ";".join(c.missing_channels)
    row["seconds_total"] = f"{sum(c.stage_seconds.values()):.3f}"
    row["sources"] = ";".join(Path(p).name for p in c.sources)
    return row


def export_csv(src: Path, out: Path, fmt: str = "wide") -> int:
    """Post-run export: rows sorted by experiment/well/field/timepoint.

    ``wide`` keeps one row per frame; ``long`` gives one row per frame and
    state (tidy data for R/pandas/Prism). Returns the number of rows written.
    """
    import pandas as pd

    from monitor.errors import BadInput

    try:
        df = pd.read_csv(src, dtype={"well": str, "field": str, "experiment": str})
    except (ValueError, OSError) as e:
        raise BadInput(src, f"not a readable CSV ({e})") from None
    missing = [c for c in ("experiment", "well", "field", "timepoint", "n_cells") if c not in df.columns]
    if missing:
        raise BadInput(src, f"not a cellmonitor counts CSV (missing columns: {', '.join(missing)})")
    df = df.sort_values(["experiment", "well", "field", "timepoint"], kind="stable")
    if fmt == "long":
        states = [c[2:] for c in df.columns if c.startswith("n_") and c not in ("n_cells", "n_uncertain")]
        keep = [c for c in ("experiment", "well", "field", "timepoint", "acquired_at", "n_cells", "control_area_um2", "control_area_fraction") if c in df]
        parts = []
        for s in states:
            p = df[keep].copy()
            p["state"] = s
            p["count"] = df[f"n_{s}"]
            p["fraction"] = df[f"frac_{s}"]
            parts.append(p)
        df = pd.concat(parts).sort_values(["experiment", "well", "field", "timepoint", "state"], kind="stable")
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return len(df)
