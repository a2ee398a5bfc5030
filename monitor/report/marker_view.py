"""Label-free calls against the death marker, by how strong the marker is: the report's view of the per-cell table.

A run whose config has ``[marker]`` rules and the ``cells`` sink records, for every cell, its
marker value (``marker_<channel>``, in the rule's units: background MADs or SNR) beside its
label-free ``state``. This view bins the cells by that value around each rule's threshold
(marker-negative, the ambiguous band, 1-2x, 2-4x and >= 4x the threshold) and gives the share
the label-free call puts in the rule's state. On the MCF7 set that share rises from about 0.6 just
past the threshold to 0.9 far past it: the label-free call sees a death that has gone far, the
marker sees it first (docs/marker-fields.md). The thresholds are those the service applied when it
wrote each cell's marker verdict: the config's, an ``"otsu"`` one as the index fitted it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def marker_rules(cfg: Any, preprocessing: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """(rules, margin) as the service applied them (:func:`monitor.marker.with_fitted`: the config's
    rules, an ``"otsu"`` threshold the number the index fitted); a rule left ``"otsu"`` is left out."""
    from monitor.marker import with_fitted

    if cfg is None or not getattr(cfg.marker, "rules", None):
        return [], 0.25
    table = with_fitted(cfg.marker.model_dump(), preprocessing.get("marker"))
    return [r for r in table["rules"] if r["threshold"] != "otsu"], float(table.get("margin", 0.25))


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
        # bands: <= lo (negative), lo < v < t (ambiguous), then from t up: [t, 2t), [2t, 4t), >= 4t
        ups = [t, 2 * t, 4 * t] if t > 0 else [t]
        names = [f"<= {lo:g} (marker-negative)", f"{lo:g} to {t:g} (ambiguous)"]
        names += [f"{a:g} to {b:g}" for a, b in zip(ups, ups[1:], strict=False)] + [f">= {ups[-1]:g}"]
        band = np.where(v <= lo, 0, 1 + np.searchsorted(ups, v, side="right"))
        band[np.isnan(v)] = -1  # no marker value: in no band
        for i, name in enumerate(names):
            m = band == i
            n = int(m.sum())
            rows.append({"channel": r["channel"], "marker state": r["state"], "marker value": name, "cells": n,
                         "share called that state label-free": round(float(called[m].mean()), 3) if n else np.nan})
    if not rows or sum(row["cells"] for row in rows) == 0:
        return None
    return pd.DataFrame(rows)
