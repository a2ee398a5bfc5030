"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

Every figure draws only columns of the per-well table of
:mod:`monitor.report.data`, so the table offered beside it holds exactly the
numbers drawn. Text is never cut: figures are saved with a tight bounding box.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from monitor.report.data import Experiment, correlation, last_timepoint, time_of, well_position

DPI = 110
UNCERTAIN_RGB = (0.45, 0.45, 0.45)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    _plt().close(fig)
    return buf.getvalue()


def _time_axis(ax: Any, e: Experiment) -> None:
    ax.set_xlabel(e.time_label)
    if e.time_label == "timepoint":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _rgb(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return c[0] / 255, c[1] / 255, c[2] / 255


def _well_colours(wells: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(wells) <= 10 else "tab20")
    return {w: cmap(i % cmap.N) for i, w in enumerate(wells)}


def timecourses(e: Experiment, colours: Mapping[str, tuple[int, int, int]]) -> bytes:
    """One panel per well: each class's fraction against time, the uncertain share shaded grey."""
    plt = _plt()
    n = len(e.wells)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.5 * nrows + 0.6), sharex=True, sharey=True, squeeze=False)
    x_all = time_of(e)
    handles: dict[str, Any] = {}
    for ax, well in zip(axes.flat, e.wells, strict=False):
        m = (e.table["well"] == well).to_numpy()
        x = np.asarray(x_all[m], float)
        for s in e.shares:
            y = np.asarray(e.table.loc[m, f"share_{s}"], float)
            if s == "uncertain":
                handles["uncertain share"] = ax.fill_between(x, 0, y, color=UNCERTAIN_RGB, alpha=0.25, lw=0, step=None)
            else:
                (handles[f"{s} share"],) = ax.plot(x, y, ls=":", color="black", lw=1.2)
        for c in e.classes:
            (handles[c],) = ax.plot(x, np.asarray(e.table.loc[m, f"frac_{c}"], float), marker="o", ms=3, lw=1.8, color=_rgb(colours[c]))
        ax.set_title(well, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes.flat[:n]:
        _time_axis(ax, e)
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of cells")
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(6, len(handles)), frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.5 * nrows + 0.6)))
    return _png(fig)


def control(e: Experiment) -> tuple[bytes, float, float, int]:
    """Control area fraction against the predicted death fraction: scatter (with Pearson r) and time courses.

    Returns the PNG and (Pearson r, Spearman rho, n) over every well and timepoint.
    """
    plt = _plt()
    t = e.table
    ctl = np.asarray(t["control_area_fraction"], float)
    death = np.asarray(t["death_fraction"], float)
    r, rho, n = correlation(ctl, death)
    wc = _well_colours(e.wells)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    x = np.asarray(time_of(e), float)
    b2 = b.twinx()  # the control area is a few percent of the field: its own axis
    for w in e.wells:
        m = (t["well"] == w).to_numpy()
        a.scatter(ctl[m], death[m], s=18, color=wc[w], label=w)
        b.plot(x[m], death[m], color=wc[w], lw=1.8)
        b2.plot(x[m], ctl[m], color=wc[w], lw=1.2, ls="--")
    b2.set_ylabel("control area fraction (dashed)")
    b2.set_ylim(bottom=0)
    states = " + ".join(e.death_states)
    a.set_xlabel("control (Otsu) area fraction")
    a.set_ylabel(f"predicted {states} fraction")
    a.set_title(f"Pearson r = {r:.2f}, Spearman ρ = {rho:.2f} (n = {n})" if n >= 3 and np.isfinite(r) else f"correlation undefined (n = {n})", fontsize=10)
    a.grid(alpha=0.3)
    if len(e.wells) <= 12:
        a.legend(fontsize=8, ncol=2, frameon=False)
    _time_axis(b, e)
    b.set_ylabel(f"predicted {states} fraction (solid)")
    b.set_ylim(-0.02, 1.02)
    b.set_title("per well over time", fontsize=10)
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig), r, rho, n


def _well_lines(e: Experiment, column: str, height: float, ylabel: str, legend_cols: int = 1) -> tuple[Any, Any]:
    """(figure, axes): ``column`` of the experiment's table against time, one line per well."""
    plt = _plt()
    wc = _well_colours(e.wells)
    fig, ax = plt.subplots(figsize=(7.5, height))
    x = np.asarray(time_of(e), float)
    for w in e.wells:
        m = (e.table["well"] == w).to_numpy()
        ax.plot(x[m], np.asarray(e.table.loc[m, column], float), marker="o", ms=3, color=wc[w], label=w)
    _time_axis(ax, e)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(e.wells) <= 24:
        ax.legend(fontsize=8, ncol=legend_cols, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig, ax


def cells_per_frame(e: Experiment) -> bytes:
    """Segmented cells per frame (mean over a well's fields) against time, one line per well."""
    fig, ax = _well_lines(e, "cells_per_frame", 3.4, "cells per frame", max(1, math.ceil(len(e.wells) / 12)))
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return _png(fig)


def plate_map(e: Experiment) -> bytes:
    """The last timepoint's death fraction per well, on the plate layout (a bar chart when wells are not plate names)."""
    plt = _plt()
    last = last_timepoint(e)
    vals = dict(zip(last["well"], np.asarray(last["death_fraction"], float), strict=True))
    pos = {w: well_position(w) for w in e.wells}
    label = f"{' + '.join(e.death_states)} fraction, last timepoint"
    if all(p is not None for p in pos.values()):
        rows = max(p[0] for p in pos.values() if p) + 1
        cols = max(p[1] for p in pos.values() if p) + 1
        rows, cols = max(rows, 1), max(cols, 1)
        grid = np.full((rows, cols), np.nan)
        for w, p in pos.items():
            if p is not None:
                grid[p] = vals[w]
        fig, ax = plt.subplots(figsize=(max(3.2, 0.62 * cols + 1.8), max(2.2, 0.55 * rows + 1.0)))
        cmap = plt.get_cmap("magma_r").with_extremes(bad="#eeeeee")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.5 else "black")
        ax.set_xticks(range(cols), [str(c + 1) for c in range(cols)])
        ax.set_yticks(range(rows), [_row_name(r) for r in range(rows)])
        ax.tick_params(length=0)
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    else:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(e.wells) + 1.5), 3.2))
        ax.bar(range(len(e.wells)), [vals[w] for w in e.wells], color="#7a1f3d")
        ax.set_xticks(range(len(e.wells)), e.wells, rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction")
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _row_name(r: int) -> str:
    s = ""
    r += 1
    while r:
        r, k = divmod(r - 1, 26)
        s = chr(65 + k) + s
    return s


def extra_column(e: Experiment, column: str) -> bytes:
    """A column the report does not know, pooled by its mean per well, against time."""
    fig, _ax = _well_lines(e, column, 3.0, column)
    fig.tight_layout()
    return _png(fig)
