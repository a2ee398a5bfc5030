"""How counts become rows: one schema for the CSV sink, the export and the demo table.

Class roles: a reference index names its classes as the lab labelled them
(``Living Cell``, ``Dead Cell``); the dashboard and the metrics speak of the
canonical states :data:`CANONICAL`. :func:`class_roles` maps each class to
one: the configured ``[classifier.roles]`` first, else identity when the name
matches a canonical state without regard to case, else ``other``. The CSV
keeps both: ``n_<class>``/``frac_<class>`` per reference class and
``state_<canonical>`` counts per canonical state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from monitor.errors import BadInput, CellmonitorError
from monitor.intake.ledger import path_text, safe_text
from monitor.records import COUNT_TALLIES, Counts

COLUMNS_FIXED = [
    "experiment", "well", "field", "timepoint", "acquired_at", "processed_at", "instrument",
    "pixel_size_um", "pixel_size_source", "n_cells",
]


#: the states the metrics and the dashboard use, whatever the reference classes are called
CANONICAL = ("live", "apoptotic", "necrotic", "dead", "other")


#: ``n_*`` columns that are not reference classes
NOT_CLASS_COUNTS = tuple(f"n_{t}" for t in COUNT_TALLIES)
#: columns added after the first layout, in the order of their versions: a file begun
#: without them is continued in its own columns (see the csv sink)
LATER_COLUMNS = ("state_", "n_unknown", "index_version", "marker_")



_ZONE = re.compile(r"(?:Z|[+-]\d\d:?\d\d)$")


def parse_times(values: Any) -> tuple[Any, str]:
    """Acquisition-time strings -> (pandas datetimes, what clock they are on).

    Vendors differ: Gen5 writes the instrument PC's local time with no zone,
    Nanolive and OME an offset. Times that all lack a zone stay naive and are
    called the instrument's local time (never relabelled UTC, which would shift
    nothing but claim a zone the files do not have); times that all carry one
    are converted to UTC; a mix is read as written with the zoned ones in UTC
    and the clock says so. Empty and unreadable strings become NaT.
    """
    import pandas as pd

    text = pd.Series(values, dtype="string").fillna("").str.strip()
    present = text[text != ""]
    zoned = present.str.contains(_ZONE, regex=True)
    if len(present) and not zoned.any():
        return pd.to_datetime(text.replace("", None), errors="coerce", format="ISO8601"), "local"
    if zoned.all():
        return pd.to_datetime(text.replace("", None), utc=True, errors="coerce", format="ISO8601"), "UTC"
    has_zone = text.str.contains(_ZONE, regex=True)
    out = pd.to_datetime(text.where(~has_zone).replace("", None), errors="coerce", format="ISO8601")
    utc = pd.to_datetime(text.where(has_zone).replace("", None), utc=True, errors="coerce", format="ISO8601").dt.tz_localize(None)
    return out.fillna(utc), "mixed"

def class_roles(classes: Iterable[str], configured: Mapping[str, str] | None = None) -> dict[str, str]:
    """Canonical state of every reference class (module docstring).

    ``configured`` keys are matched to class names without regard to case;
    a key that names no class is the caller's to report.
    """
    conf = {k.casefold(): v for k, v in (configured or {}).items()}
    out = {}
    for c in classes:
        role = conf.get(c.casefold())
        if role is None:
            role = c.casefold() if c.casefold() in CANONICAL else "other"
        out[c] = role
    return out


def by_role(counts: Mapping[str, int], roles: Mapping[str, str]) -> dict[str, int]:
    """Counts per canonical state (every canonical state present, zeros included)."""
    out = dict.fromkeys(CANONICAL, 0)
    for cls, n in counts.items():
        out[roles.get(cls, "other")] += int(n)
    return out


def counts_row(c: Counts, roles: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Flat row: fixed identity columns, ``n_<class>`` and ``frac_<class>`` per class,
    ``state_<canonical>`` per canonical state, control signal."""
    row: dict[str, Any] = {
        "experiment": safe_text(c.key.experiment),  # names parsed from file names may not be UTF-8
        "well": safe_text(c.key.well),
        "field": safe_text(c.key.field),
        "timepoint": c.key.timepoint,
        "acquired_at": c.acquired_at.isoformat() if c.acquired_at else "",
        "processed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "instrument": safe_text(c.instrument),
        "pixel_size_um": f"{c.pixel_size_um:.4f}",
        "pixel_size_source": c.pixel_size_source,
        "n_cells": c.n_cells,
    }
    for state, n in c.counts.items():
        row[f"n_{state}"] = n
    for state in c.counts:
        row[f"frac_{state}"] = f"{c.fraction(state):.4f}"
    for role, n in by_role(c.counts, roles if roles is not None else class_roles(c.counts)).items():
        row[f"state_{role}"] = n
    row["n_uncertain"] = c.n_uncertain
    row["n_unknown"] = c.n_unknown
    row["mean_certainty"] = "" if math.isnan(c.mean_certainty) else f"{c.mean_certainty:.4f}"
    ctl = c.control
    row["control_channel"] = ctl.channel if ctl else ""
    row["control_area_um2"] = f"{ctl.area_um2:.2f}" if ctl else ""
    row["control_area_fraction"] = f"{ctl.area_fraction:.5f}" if ctl else ""
    row["control_regions"] = ctl.n_regions if ctl else ""
    row["missing_channels"] = ";".join(c.missing_channels)
    row["seconds_total"] = f"{sum(c.stage_seconds.values()):.3f}"
    row["sources"] = ";".join(path_text(Path(p).name) for p in c.sources)
    row["index_version"] = c.index_version
    m = c.marker
    row["marker_cells"] = m.n_labelled if m else ""
    row["marker_agree"] = m.n_agree if m else ""
    row["marker_agreement"] = f"{m.fraction:.4f}" if m and m.n_labelled else ""
    return row


def export_csv(src: Path, out: Path, fmt: str = "wide") -> int:
    """Post-run export: rows sorted by experiment/well/field/timepoint.

    ``wide`` keeps one row per frame; ``long`` gives one row per frame and
    state (tidy data for R/pandas/Prism); ``parquet`` writes one Parquet file
    per experiment into the folder ``out`` (``<experiment>.parquet``, wide,
    typed columns: integers, floats, a UTC timestamp, strings). Returns the
    number of rows written.
    """
    df = read_counts(src)
    if fmt == "parquet":
        return _export_parquet(df, out)
    return _export_table(df, out, fmt)


def read_counts(src: Path) -> Any:
    """The counts CSV as a DataFrame; :class:`BadInput` when it is not one."""
    import pandas as pd


    try:
        df = pd.read_csv(src, dtype={"well": str, "field": str, "experiment": str, "sources": str, "control_channel": str,
                                     "missing_channels": str, "pixel_size_source": str, "instrument": str})
    except (ValueError, OSError) as e:
        raise BadInput(src, f"not a readable CSV ({e})") from None
    missing = [c for c in ("experiment", "well", "field", "timepoint", "n_cells") if c not in df.columns]
    if missing:
        raise BadInput(src, f"not a cellmonitor counts CSV (missing columns: {', '.join(missing)})")
    return df.sort_values(["experiment", "well", "field", "timepoint"], kind="stable")


def _export_table(df: Any, out: Path, fmt: str) -> int:
    import pandas as pd

    if fmt == "long":
        states = [c[2:] for c in df.columns if c.startswith("n_") and c not in NOT_CLASS_COUNTS]
        # each state's row keeps what says how far the frame's counts can be trusted
        keep = [c for c in ("experiment", "well", "field", "timepoint", "acquired_at", "n_cells", "n_unknown", "n_uncertain",
                            "missing_channels", "control_area_um2", "control_area_fraction") if c in df]
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


def _export_parquet(df: Any, folder: Path) -> int:
    import re

    import pandas as pd


    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise CellmonitorError("--format parquet needs pyarrow (pip install pyarrow)") from None
    if folder.exists() and not folder.is_dir():
        raise CellmonitorError(f"{folder}: --format parquet writes one file per experiment into a folder; this is a file")
    typed = df.copy()
    if "acquired_at" in typed:  # the instrument's clock as written (Gen5: local time, no zone)
        typed["acquired_at"] = parse_times(typed["acquired_at"])[0]
    if "processed_at" in typed:  # written by the service, always UTC
        typed["processed_at"] = pd.to_datetime(typed["processed_at"], utc=True, errors="coerce", format="ISO8601")
    for col in typed.columns:
        if col.startswith(("n_", "state_")) or col in ("timepoint", "n_cells", "control_regions"):
            typed[col] = pd.to_numeric(typed[col], errors="coerce").astype("Int64")
        elif col.startswith("frac_") or col in ("pixel_size_um", "mean_certainty", "control_area_um2", "control_area_fraction", "seconds_total"):
            typed[col] = pd.to_numeric(typed[col], errors="coerce").astype("float64")
        elif typed[col].dtype == object:
            typed[col] = typed[col].astype("string")
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for exp, part in typed.groupby("experiment", sort=True):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(exp)).strip("._") or "experiment"
        part.reset_index(drop=True).to_parquet(folder / f"{name}.parquet", index=False)
        n += len(part)
    return n
