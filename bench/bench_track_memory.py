"""What a run of many timepoints keeps in memory for tracks and fates, with and without the window.

    .venv/bin/python bench/bench_track_memory.py [--fields 8] [--timepoints 120] [--cells 200] [--window 48] [--write FILE]

The per-cell sink (``cells``, with tracking and the fates store, as the service runs it) is fed
``--fields`` fields of ``--cells`` drifting cells for ``--timepoints`` hourly timepoints, each cell
called with a random state and certainty; the Python heap it holds (``tracemalloc``, after a
``gc``) is read after every timepoint. The same run feeds a second sink with
``memory_timepoints = 0`` (everything kept: the baseline, the behaviour before the window). RSS
is not used: its swings of 100 MB and more from one frame to the next hide tens of MB; the
traced heap is exact. Reported: the heap at quarters of the run, the slope over its last half
in bytes per cell and timepoint, and what that slope holds after a week of an hourly 96-well
plate at 4 fields a well (384 fields, 168 timepoints).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import emit  # noqa: E402

PX = 0.5
CLASSES = ("live", "apoptotic", "necrotic", "dead")
WEEK_CELL_TIMEPOINTS = 384 * 168  # fields x timepoints of an hourly 96-well plate, 4 fields a well, for a week


def counts(field: str, t: int, pos: np.ndarray, rng: np.random.Generator) -> object:
    from monitor.records import CellCalls, Counts, FrameKey

    n = len(pos)
    st, cert = rng.integers(0, 4, n), rng.uniform(0.3, 1.0, n)
    calls = CellCalls(np.zeros((8, 8)), np.zeros((8, 8), int), np.arange(n) + 1, st, np.zeros(n, bool), CLASSES, PX,
                      certainty=cert, centroid_yx_px=pos / PX, area_um2=np.full(n, 50.0))
    return Counts(FrameKey("e", "A1", field, t), "t", None, PX, "config", n, {c: int((st == i).sum()) for i, c in enumerate(CLASSES)},
                  0, float(cert.mean()), None, sources=(Path(f"/x/{field}_{t}.tif"),), calls=calls)


def heap_mb() -> float:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 2**20


def run(window: int, args: argparse.Namespace, root: Path, timepoints: int | None = None) -> tuple[list[float], float]:
    """Heap (MB) after each timepoint of one sink, and its seconds."""
    from cellmonitor_plugins.sinks.cells import CellTableSink

    from monitor.fate.store import FateStore
    from monitor.fate.tracking import LinkParams

    rng = np.random.default_rng(0)
    pos = {str(f): rng.uniform(0, 600, (args.cells, 2)) for f in range(args.fields)}
    tracemalloc.start()
    base = heap_mb()
    sink = CellTableSink(root / "cells", tracking=LinkParams(memory_timepoints=window), store=FateStore(root / "fates.sqlite"))
    out, t0 = [], time.perf_counter()
    timepoints = timepoints or args.timepoints
    for t in range(1, timepoints + 1):
        for f in pos:
            pos[f] = pos[f] + rng.normal(0, 1.0, pos[f].shape)
            sink.write(counts(f, t, pos[f], rng))  # type: ignore[arg-type]
        out.append(heap_mb() - base)
        if sys.stderr.isatty():
            print(f"\r  window {window}: timepoint {t}/{timepoints}, heap {out[-1]:.1f} MB", end="", file=sys.stderr)
    secs = time.perf_counter() - t0
    del sink
    tracemalloc.stop()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return out, secs


def main() -> int:
    from monitor.report.classification import table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=8)
    ap.add_argument("--timepoints", type=int, default=120)
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--window", type=int, default=48, help="memory_timepoints of the windowed sink (the default of [tracking])")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:  # warm-up, not reported: the imports and the libraries' caches
        run(args.window, args, Path(tmp), timepoints=3)
    for label, window in ((f"window of {args.window} timepoints", args.window), ("whole run kept (baseline, before)", 0)):
        with tempfile.TemporaryDirectory() as tmp:
            heap, secs = run(window, args, Path(tmp))
        curves[label] = heap
        n = len(heap)
        half = np.arange(n // 2, n)
        slope_mb = float(np.polyfit(half, np.asarray(heap)[n // 2:], 1)[0])  # MB per timepoint over the last half
        per_cell = slope_mb * 2**20 / (args.fields * args.cells)
        quarters = [heap[max(0, n * k // 4 - 1)] for k in (1, 2, 3, 4)]
        rows.append([label, *quarters, per_cell, per_cell * args.cells * WEEK_CELL_TIMEPOINTS / 2**30, secs])
    head = ["sink", *[f"heap MB at t{args.timepoints * k // 4}" for k in (1, 2, 3, 4)],
            "slope, last half, bytes / cell / timepoint", f"that slope over a plate-week ({args.cells} cells x 384 fields x 168 h), GB",
            "seconds"]
    lines = ["# Tracks and fates in memory over a run: with and without the window", "",
             f"Command: `.venv/bin/python bench/bench_track_memory.py --fields {args.fields} --timepoints {args.timepoints} "
             f"--cells {args.cells} --window {args.window}`. The per-cell sink with tracking and the fates store, fed "
             f"{args.fields} fields x {args.cells} drifting cells for {args.timepoints} timepoints; Python heap traced after every "
             "timepoint (tracemalloc, after a gc), both sinks in the same run.", "", table(head, rows), ""]
    emit(lines, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
