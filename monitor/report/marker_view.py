"""Label-free calls against the death marker, by how strong the marker is: the report's view of the per-cell table.

A run whose config has ``[marker]`` rules and the ``cells`` sink records, for every cell, its
marker value (``marker_<channel>``, in the rule's units: background MADs or SNR) beside its
label-free ``state``. This view bins the cells by that value around each rule's threshold
(marker-negative, the ambiguous band, 1-2x, 2-4x and >= 4x the threshold) and gives the share
the label-free call puts in the rule's state. On the MCF7 set that share rises from about 0.6 just
past the threshold to 0.9 far past it: the label-free call sees a death that has gone far, the
marker sees it first (docs/marker-fields.md). The thresholds are the index's (resolved when it was
built ``--from-marker``), else the config's numeric ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def marker_rules(cfg: Any) -> tuple[list[dict[str, Any]], float]:
    """(rules with numeric thresholds, margin): the index's resolved rules, else the config's numeric ones."""
    from monitor.index.metafile import read_meta

    if cfg is None or not getattr(cfg.marker, "rules", None):
        return [], 0.25
    try:
        rec = (read_meta(Path(cfg.classifier.index) / "meta.json").preprocessing or {}).get("marker") or {}
    except ValueError:
        rec = {}
    if rec.get("rules"):
        return list(rec["rules"]), float(rec.get("margin", 0.25))
    table = cfg.marker.model_dump()
    rules = [r for r in table["rules"] if isinstance(r.get("threshold"), int | float)]
    return rules, float(table.get("margin", 0.25))


def strength_table(cells: Any, rules: list[dict[str, Any]], margin: float) -> Any:
    """One row per rule and band of marker value: how many cells, and the share the label-free call
    puts in the rule's state. None when no cell carries a rule's marker value."""
    import pandas as pd

    rows = []
    for r in rules:
        col = f"marker_{r['channel']}"
        if col not in cells or "state" not in cells:
            continue
        v = pd.to_numeric(cells[col], errors="coerce").to_numpy(float)
        called = (cells["state"] == r["state"]).to_numpy()
        t = float(r["threshold"])
        lo = float(r["ambiguous_above"]) if r.get("ambiguous_above") is not None else t - margin * abs(t)
        bands = [(-np.inf, lo, f"<= {lo:g} (marker-negative)"), (lo, t, f"{lo:g} to {t:g} (ambiguous)")]
        bands += ([(t, 2 * t, f"{t:g} to {2 * t:g}"), (2 * t, 4 * t, f"{2 * t:g} to {4 * t:g}"), (4 * t, np.inf, f">= {4 * t:g}")]
                  if t > 0 else [(t, np.inf, f">= {t:g}")])
        for a, b, name in bands:
            m = (v <= b) if a == -np.inf else (v > a) & (v < b) if b == t else (v >= a) & (v < b)
            n = int(m.sum())
            rows.append({"channel": r["channel"], "marker state": r["state"], "marker value": name, "cells": n,
                         "share called that state label-free": round(float(called[m].mean()), 3) if n else np.nan})
    if not rows or sum(row["cells"] for row in rows) == 0:
        return None
    return pd.DataFrame(rows)
