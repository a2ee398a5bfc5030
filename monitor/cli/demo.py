"""``cellmonitor demo``: the real service on a synthetic time-lapse, with the truth beside the counts."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add this command group's subcommands to ``sub``."""
    p = sub.add_parser("demo", help="run the whole service on a synthetic time-lapse (no downloads, no GPU)")
    p.add_argument("--out", type=Path, help="demo folder (default: a new temporary folder, kept)")
    p.add_argument("--timepoints", type=int, default=8)
    p.add_argument("--port", type=int, default=9108, help="port for /metrics while the demo runs (0 = off)")
    p.set_defaults(func=_demo)



def _demo(args: argparse.Namespace) -> int:
    from monitor.demo.run import STATES, run_demo

    if args.timepoints < 1:
        from monitor.errors import UsageError

        raise UsageError(f"--timepoints must be at least 1 (got {args.timepoints})")
    folder = args.out or Path(tempfile.mkdtemp(prefix="cellmonitor-demo-"))
    if (folder / "state" / "ledger.sqlite").exists():
        from monitor.errors import CellmonitorError

        raise CellmonitorError(f"{folder}: already holds a demo run; give a new --out folder")
    print("cellmonitor demo: the images are SYNTHETIC (generated cells, not microscopy).", flush=True)
    print(f"demo folder: {folder}", flush=True)
    res = run_demo(folder, n_timepoints=args.timepoints, metrics_port=args.port or None, say=lambda m: print(m, flush=True))
    print()
    print("counts per timepoint (fractions of segmented cells; truth = what the generator drew)")
    head = f"{'well':<5}{'t':>3}{'cells':>7}{'true':>6}" + "".join(f"{s:>11}{'true':>6}" for s in STATES) + f"{'uncert.':>9}{'Apo-15 area':>13}"
    print(head)
    print("-" * len(head))
    for c in sorted(res.counts, key=lambda c: (c.key.well, c.key.timepoint)):
        truth = res.truth[(c.key.well, c.key.timepoint)]
        n_true = sum(truth.values())
        row = f"{c.key.well:<5}{c.key.timepoint:>3}{c.n_cells:>7}{n_true:>6}"
        for s in STATES:
            row += f"{c.fraction(s):>11.0%}{truth[s] / n_true if n_true else 0:>6.0%}"
        ctl = f"{c.control.area_fraction:.1%}" if c.control else "-"
        row += f"{c.n_uncertain:>9}{ctl:>13}"
        print(row)
    errors = [abs(c.fraction(s) - res.truth[(c.key.well, c.key.timepoint)][s] / max(1, sum(res.truth[(c.key.well, c.key.timepoint)].values()))) for c in res.counts for s in STATES]
    print(f"\nmean absolute error of the state fractions against the truth: {100 * sum(errors) / max(1, len(errors)):.1f} percentage points")
    _fates_summary(res, folder)
    print(f"reference index: {res.n_references} labelled synthetic cells ({folder / 'index'})")
    print(f"counts CSV:      {res.csv_path}")
    print(f"config used:     {folder / 'demo.toml'}  (run it yourself: cellmonitor run {folder / 'demo.toml'})")
    if res.metrics_url:
        print(f"metrics were served at {res.metrics_url} while the demo ran")
    print(f"torch:           {torch_build()}")
    print(f"done in {res.seconds:.0f} s")
    return 0


def _fates_summary(res, folder: Path) -> None:  # type: ignore[no-untyped-def]
    """Tracks, median time to death and EC50 of the demo's dose series, against the generator's."""
    from cellmonitor_plugins.sinks.cells import read_cells

    from monitor.fate.fates import fate_tables
    from monitor.fate.platemap import parse_plate_map

    cells_dir = folder / "state" / "cells"
    if res.dose is None or not cells_dir.is_dir():
        return
    cells = read_cells(cells_dir)
    if "track_id" not in cells:
        print("\nno tracks (laptrack is not installed)")
        return
    plate = parse_plate_map(folder / "plate.csv")
    t = fate_tables(cells, None, plate)
    n_tracks = int(cells.groupby(["experiment", "well", "field"])["track_id"].nunique().sum())
    print(f"\ntracks: {n_tracks} over {cells['timepoint'].nunique()} timepoints, {len(t['survival'])} wells "
          f"(per-cell rows with track_id: {cells_dir})")
    print(f"{'well':<5}{'conc uM':>9}{'tracks':>8}{'deaths':>8}{'median TTD (h)':>16}{'log-rank p':>12}")
    for r in t["survival"].itertuples():
        med = "not reached" if r.median_ttd_h != r.median_ttd_h else f"{r.median_ttd_h:.1f}"
        p = "-" if r.logrank_p != r.logrank_p else f"{r.logrank_p:.3g}"
        print(f"{r.well:<5}{r.concentration:>9g}{r.tracks:>8}{r.deaths:>8}{med:>16}{p:>12}")
    sc = t["smoothed_counts"]
    errs = []
    for r in sc.itertuples():
        truth = res.truth.get((r.well, int(r.timepoint)))
        n = sum(getattr(r, f"smoothed_{s}") for s in ("live", "apoptotic", "necrotic", "dead"))
        if truth and n:
            n_true = sum(truth.values())
            errs += [abs(getattr(r, f"smoothed_{s}") / n - truth[s] / n_true) for s in ("live", "apoptotic", "necrotic", "dead")]
    if errs:
        print(f"mean absolute error of the SMOOTHED state fractions (one-way along each track) against the truth: "
              f"{100 * sum(errs) / len(errs):.1f} percentage points (a quarter of the frames are out of focus on purpose: "
              "their per-frame calls flicker, the tracks do not)")
    dr = t.get("dose_response")
    if dr is not None and len(dr):
        last = dr[(dr.timepoint == dr.timepoint.max()) & (dr.measure == "dead")].iloc[0]
        got = f"{last.ec50:.2f} uM [{last.ec50_low:.2f}, {last.ec50_high:.2f}]" if last.ok else f"no usable fit ({last.reason})"
        print(f"EC50 of the dead fraction at t{int(last.timepoint)}: {got}; the generator's: {res.dose.ec50_um:g} uM")
    print(f"tracks and fates as Parquet: cellmonitor export {folder / 'demo.toml'} --out counts.csv --fates fates/")


def torch_build() -> str:
    """Which torch build ran: its version, CPU-only or CUDA, and whether a GPU was used."""
    import torch

    from monitor.device import cuda_status

    usable, detail = cuda_status()
    kind = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
    return f"{torch.__version__}, {kind}; " + (f"ran on the GPU ({detail})" if usable else "ran on the CPU")
