"""Tracking, smoothing and dose-response benchmark (not a test).

1. t98g_phase (real cells, 37 frames, instance masks whose ids are consistent
   over time): frames through the ``masks`` segmenter (the true masks as the
   segmentation) and through the ``classical`` segmenter, each linked frame by
   frame as the service does (:class:`monitor.fate.tracking.FieldTracks`).
   Measures, Cell-Tracking-Challenge style, with cells matched to the truth
   (masks: by id; classical: the true cell under the segment's centroid, one
   segment per true cell at most):
   link recall (true frame-to-frame links kept: the cell at t and t+1 share a
   track id), link precision (links made that are true), LNK-F1, track
   fraction TF (mean share of a true track followed by its main track id) and
   complete tracks CT (true tracks followed by one id from start to end).
2. The demo's synthetic dose series (the real service: reader, segmenter,
   EfficientNet-Lite0, index, per-cell sink with tracks): per-cell state
   accuracy raw vs smoothed against the generator's truth, time-of-death error
   in timepoints, and EC50 of the dead fraction at the last timepoint against
   the generator's value.
3. Overhead at 200 cells per frame: a frame's processing (process_frame with
   the demo's pipeline) against tracking (the cells sink's write with and
   without tracking) and smoothing (every track of the field), in the same run.

    .venv/bin/python -m bench.bench_tracking --write bench/results/tracking.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
T98G_UM = 0.65  # no pixel size in the files; the segmentation benchmark takes the same


# -- 1. real cells -------------------------------------------------------------------------------
def t98g_frames(data: Path, limit: int | None = None):
    """(frame path, true id mask) per timepoint."""
    from skimage.io import imread

    root = data / "timelapse" / "t98g_phase"
    frames = sorted((root / "frames").glob("*.tif"))
    masks = sorted((root / "masks").glob("id_masks_*.png"))
    n = min(len(frames), len(masks), limit or 10**9)
    return [(frames[i], imread(masks[i])) for i in range(n)]


def segment_all(pairs, segmenter: str, work: Path):
    """Per timepoint: (labels, centroids in um, true id of each segment (0: none))."""
    import tifffile
    from cellmonitor_plugins.segmenters.classical import PLUGIN as CLASSICAL
    from cellmonitor_plugins.segmenters.masks import PLUGIN as MASKS

    from monitor.imaging import rescale
    from monitor.protocols import BuildContext
    from monitor.records import Frame, FrameKey

    ctx = BuildContext(state_dir=work)
    if segmenter == "masks":
        import imageio.v3 as iio

        for f, m in pairs:
            iio.imwrite(work / (f.stem + "_cp_masks.png"), m)
        seg = MASKS.build(MASKS.Options(folder=work), ctx)
    else:
        seg = CLASSICAL.build(CLASSICAL.Options(), ctx)
    out = {}
    seconds = []
    for t, (f, truth) in enumerate(pairs):
        img = tifffile.imread(f)
        frame = Frame(FrameKey("t98g", "-", "1", t), {"phase": img}, "phase", None, T98G_UM, "config", "bench", sources=(f,))
        frame = rescale(frame, 0.322)
        t0 = time.perf_counter()
        cells = seg.segment(frame)
        seconds.append(time.perf_counter() - t0)
        labels = np.array([c.id for c in cells.cells], dtype=np.int64)
        yx_px = np.array([c.centroid_yx_px for c in cells.cells], dtype=float).reshape(-1, 2)
        # the true cell under each centroid, on the truth's own grid
        sy, sx = truth.shape[0] / cells.labels.shape[0], truth.shape[1] / cells.labels.shape[1]
        iy = np.clip((yx_px[:, 0] * sy).astype(int), 0, truth.shape[0] - 1)
        ix = np.clip((yx_px[:, 1] * sx).astype(int), 0, truth.shape[1] - 1)
        # masks: a segment's label is the true id; classical: the true cell under its centroid
        ids = labels.copy() if segmenter == "masks" else truth[iy, ix].astype(np.int64)
        # one segment per true cell: a true cell split in two keeps the segment nearest its centre
        if segmenter != "masks":
            seen: dict[int, int] = {}
            for i, g in enumerate(ids):
                if g and g in seen:
                    ids[i] = 0
                elif g:
                    seen[int(g)] = i
        out[t] = (labels, yx_px * cells.pixel_size_um, ids)
    return out, float(np.median(seconds))


def tracking_scores(segs, order=None) -> dict[str, float]:
    """Link the segmented frames online and score the links against the true ids."""
    from monitor.fate.tracking import link_all

    frames = {t: (lab, yx) for t, (lab, yx, _) in segs.items()}
    t0 = time.perf_counter()
    ft = link_all(frames, order=order)
    per_frame = (time.perf_counter() - t0) / len(frames)
    ids = ft.track_ids()
    true_of = {(t, int(lab)): int(g) for t, (labs, _, gs) in segs.items() for lab, g in zip(labs, gs, strict=True)}
    # true links: the same true cell at t and t+1 (both segmented)
    node_of = {}
    for (t, lab), g in true_of.items():
        if g:
            node_of[(t, g)] = (t, lab)
    true_links = [(node_of[(t, g)], node_of[(t + 1, g)]) for (t, g) in node_of if (t + 1, g) in node_of]
    kept = sum(ids[a] == ids[b] for a, b in true_links)
    # links made (each cell to its predecessor, gaps included), judged where both ends are true cells
    made = [(p, c) for c, p in ft.links.items() if true_of.get(c) and true_of.get(p)]
    right = sum(true_of[p] == true_of[c] for p, c in made)
    # TF and CT over true tracks
    by_gt: dict[int, list[tuple[int, int]]] = {}
    for (_, g), node in sorted(node_of.items()):
        by_gt.setdefault(g, []).append(node)
    tf, ct = [], []
    for nodes in by_gt.values():
        if len(nodes) < 2:
            continue
        tids = [ids[n] for n in nodes]
        best = max(tids.count(x) for x in set(tids))
        tf.append(best / len(tids))
        ct.append(len(set(tids)) == 1)
    rec = kept / max(1, len(true_links))
    prec = right / max(1, len(made))
    return {"true_links": len(true_links), "recall": rec, "precision": prec, "f1": 2 * rec * prec / max(1e-9, rec + prec),
            "tf": float(np.mean(tf)), "ct": float(np.mean(ct)), "tracks": len(set(ids.values())),
            "s_per_frame": per_frame, "cells_per_frame": float(np.mean([len(v[0]) for v in segs.values()])),
            "matched": float(np.mean([np.mean(v[2] > 0) if len(v[2]) else 0 for v in segs.values()]))}


# -- 2. synthetic dose series --------------------------------------------------------------------
def synthetic(n_timepoints: int, cells_per_field: int, work: Path) -> dict[str, float]:
    from cellmonitor_plugins.sinks.cells import read_cells

    from monitor.demo.run import run_demo
    from monitor.fate.fates import dose_response, smooth_cells
    from monitor.fate.platemap import parse_plate_map

    res = run_demo(work / "demo", n_timepoints=n_timepoints, cells_per_field=cells_per_field, metrics_port=None, say=lambda m: None)
    cells = read_cells(work / "demo" / "state" / "cells")
    fates = smooth_cells(cells)
    df = fates.cells
    truth = [res.true_state(r.well, int(r.timepoint), r.centroid_y_um, r.centroid_x_um) for r in df.itertuples()]
    df["truth"] = truth
    on = df[df.truth.notna()]
    raw_acc = float((on.state == on.truth).mean())
    smo_acc = float((on.smoothed_state == on.truth).mean())
    # time of death, per tracked true cell that dies within the run (timepoints)
    assert res.dose is not None
    errs, missed = [], 0
    for (well, tid), g in on.groupby(["well", "track_id"]):
        g = g.sort_values("timepoint")
        true_dead = g[g.truth.isin(["dead"])]
        if len(true_dead) == 0 or g.truth.iloc[0] == "dead":
            continue
        t_true = int(true_dead.timepoint.iloc[0])
        tr = fates.tracks[(fates.tracks.well == well) & (fates.tracks.track_id == tid)]
        raw_dead = g[g.state.isin(["dead", "necrotic"])]
        if tr.died.iloc[0]:
            errs.append(("smoothed", tr.death_h.iloc[0] - t_true))
        else:
            missed += 1
        if len(raw_dead):
            errs.append(("raw", int(raw_dead.timepoint.iloc[0]) - t_true))
    sm = np.array([e for k, e in errs if k == "smoothed"], dtype=float)
    rw = np.array([e for k, e in errs if k == "raw"], dtype=float)
    pm = parse_plate_map(work / "demo" / "plate.csv")
    dr = dose_response(fates.smoothed_counts, pm)
    dr_raw = dose_response(fates.smoothed_counts, pm, prefix="")
    last = int(df.timepoint.max())

    def ec50(table):
        row = table[(table.timepoint == last) & (table.measure == "dead")].iloc[0]
        return float(row.ec50), float(row.ec50_low), float(row.ec50_high), bool(row.ok), str(row.reason)

    e_s, e_r = ec50(dr), ec50(dr_raw)
    # per well at the last timepoint: the generator's dead fraction against the raw and smoothed ones
    sc = fates.smoothed_counts[fates.smoothed_counts.timepoint == last].set_index("well")
    wells = []
    for w, c in res.dose.wells:
        truth_last = res.truth[(w, last)]
        n_true = sum(truth_last.values())
        r = sc.loc[w]
        n = r[["live", "apoptotic", "dead", "necrotic"]].sum()
        wells.append((w, c, res.dose.p_dead(c), (truth_last["dead"] + truth_last["necrotic"]) / max(1, n_true),
                      (r.dead + r.necrotic) / max(1, n), (r.smoothed_dead + r.smoothed_necrotic) / max(1, n), int(n), n_true))
    # the reference: the same fit on the fractions the generator drew (what a perfect pipeline would see)
    from monitor.fate.doseresponse import fit_dose_response

    drawn = fit_dose_response([c for _, c, *_ in wells], [tf for _, _, _, tf, *_ in wells], [nt for *_, nt in wells])
    return {"ec50_drawn": (drawn.ec50, drawn.ec50_low, drawn.ec50_high, drawn.ok, drawn.reason),
            "cells": len(on), "raw_acc": raw_acc, "smoothed_acc": smo_acc, "tod_mae_smoothed": float(np.mean(np.abs(sm))) if len(sm) else float("nan"),
            "tod_mae_raw_first_call": float(np.mean(np.abs(rw))) if len(rw) else float("nan"), "tod_n": len(sm), "tod_missed": missed,
            "ec50_true": res.dose.ec50_um, "ec50_smoothed": e_s, "ec50_raw": e_r, "last": last, "seconds": res.seconds,
            "tracks": int(df.groupby(["well", "field"]).track_id.nunique().sum()), "wells": wells}


# -- 3. overhead ---------------------------------------------------------------------------------
def overhead(work: Path, n_cells: int = 200, frames: int = 6) -> dict[str, float]:
    """Seconds per frame at ``n_cells`` cells: the pipeline, the cells sink without and with
    tracking, and smoothing every track of the field so far."""
    from cellmonitor_plugins.sinks.cells import CellTableSink, read_cells

    from monitor.config import load_config
    from monitor.demo.run import DEMO_CONFIG, FRAME_UM, build_reference
    from monitor.demo.synthetic import make_cells, moved, render_field
    from monitor.fate.fates import smooth_cells
    from monitor.fate.tracking import LinkParams
    from monitor.intake.assemble import merge
    from monitor.pipeline import process_frame
    from monitor.protocols import context_from
    from monitor.records import Acquisition, FrameKey
    from monitor.registry import Registry
    from monitor.service.wiring import build_pipeline, pipeline_without_index

    cfg_path = work / "demo.toml"
    cfg_path.write_text(DEMO_CONFIG.replace("metrics_port = 9108", "metrics_port = 0"))
    cfg = load_config(cfg_path)
    reg = Registry(cfg.plugins.paths)
    ctx = context_from(cfg, device="cpu")
    boot = pipeline_without_index(cfg, reg, ctx)
    build_reference(boot, 20, 7, lambda m: None).save(cfg.classifier.index)
    pipe = replace(build_pipeline(cfg, reg, ctx), keep_calls=True)
    side = int(np.sqrt(n_cells / 16) * 560)
    rng = np.random.default_rng(3)
    cells = make_cells(n_cells, side * FRAME_UM, rng, onset_scale=6.0, n_timepoints=frames)
    plain = CellTableSink(work / "plain", "parquet", tracking=None)
    tracked = CellTableSink(work / "tracked", "parquet", tracking=LinkParams())
    rows = {"pipeline": [], "sink": [], "sink_tracks": [], "smoothing": [], "cells": []}
    for t in range(frames):
        phase, fluo, _ = render_field(moved(cells, t), t, (side, side), FRAME_UM, 11 + t)
        acq = Acquisition(Path(f"f_{t}.tif"), FrameKey("bench", "A1", "1", t), {"phase": phase, "apo15": fluo}, FRAME_UM, "config", "synthetic")
        frame = merge([acq], "phase", "apo15")
        t0 = time.perf_counter()
        counts = process_frame(frame, pipe)
        rows["pipeline"].append(time.perf_counter() - t0)
        rows["cells"].append(counts.n_cells)
        t0 = time.perf_counter()
        plain.write(counts)
        rows["sink"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tracked.write(counts)
        rows["sink_tracks"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        smooth_cells(read_cells(work / "tracked"))
        rows["smoothing"].append(time.perf_counter() - t0)
    skip = 1  # the first frame warms the encoder and imports laptrack
    return {k: float(np.median(v[skip:])) for k, v in rows.items()}


def long_run(work: Path, n_cells: int = 200, frames: int = 100) -> dict[str, float]:
    """The per-cell sink's seconds per frame late in a long run (the last 10 of ``frames``
    timepoints of one field at ``n_cells`` cells): without tracking, with tracking, and with
    tracking and the fates store (the whole field smoothed again, smoothed counts written).
    Cells wander and flicker between states; no pipeline (its time is in the table above)."""
    from cellmonitor_plugins.sinks.cells import CellTableSink

    from monitor.fate.store import FateStore
    from monitor.fate.tracking import LinkParams
    from monitor.records import CellCalls, Counts, FrameKey

    rng = np.random.default_rng(5)
    pos = rng.uniform(20, 2000, (n_cells, 2))
    sinks = {"plain": CellTableSink(work / "plain", tracking=None),
             "tracks": CellTableSink(work / "tracks", tracking=LinkParams()),
             "tracks_fates": CellTableSink(work / "fates", tracking=LinkParams(), store=FateStore(work / "fates.sqlite"))}
    seconds: dict[str, list[float]] = {k: [] for k in sinks}
    for t in range(frames):
        pos = pos + rng.normal(0, 1.5, pos.shape)
        st = rng.integers(0, 4, n_cells)
        calls = CellCalls(np.zeros((8, 8)), np.zeros((8, 8), int), np.arange(n_cells) + 1, st, np.zeros(n_cells, bool),
                          ("live", "apoptotic", "dead", "necrotic"), 0.5, certainty=rng.uniform(0, 1, n_cells),
                          centroid_yx_px=pos / 0.5, area_um2=np.full(n_cells, 80.0))
        c = Counts(FrameKey("long", "A1", "1", t), "bench", None, 0.5, "config", n_cells, {}, 0, 0.5, None, calls=calls)
        for k, sink in sinks.items():
            t0 = time.perf_counter()
            sink.write(c)
            if t >= frames - 10:
                seconds[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--write", type=Path)
    ap.add_argument("--limit", type=int, help="t98g: first N frames only")
    ap.add_argument("--timepoints", type=int, default=10, help="synthetic dose series: timepoints")
    ap.add_argument("--cells", type=int, default=20, help="synthetic dose series: cells per well")
    ap.add_argument("--skip", nargs="*", default=[], choices=["t98g", "synthetic", "overhead"])
    a = ap.parse_args(argv)
    out: list[str] = ["# Tracking, smoothing and dose response", "",
                      "Written by `bench/bench_tracking.py` (see its docstring for what each number means).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "t98g" not in a.skip and (a.data / "timelapse" / "t98g_phase").is_dir():
            pairs = t98g_frames(a.data, a.limit)
            out += ["## Real cells: t98g_phase (37 frames, one field, true ids from the masks)", "",
                    f"Pixel size taken as {T98G_UM} um/px, rescaled to 0.322 um/px; `[tracking]` defaults "
                    "(max_step_um 25, max_gap 1, divisions on); frames linked one by one as they arrive.", "",
                    "| segmentation | cells/frame | matched to a true cell | true links | link recall | link precision | LNK-F1 | TF | CT | tracks | linking s/frame |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]
            for segname in ("masks", "classical"):
                sub = work / segname
                sub.mkdir()
                segs, _ = segment_all(pairs, segname, sub)
                r = tracking_scores(segs)
                out.append(f"| {segname} | {r['cells_per_frame']:.0f} | {r['matched']:.1%} | {r['true_links']} | {r['recall']:.1%} | "
                           f"{r['precision']:.1%} | {r['f1']:.3f} | {r['tf']:.3f} | {r['ct']:.1%} | {r['tracks']} | {r['s_per_frame']:.3f} |")
                print(out[-1], flush=True)
                if segname == "masks":
                    rng = np.random.default_rng(0)
                    order = list(range(len(segs)))
                    for i in range(0, len(order) - 3, 5):  # every fifth frame swapped with a later one
                        j = i + int(rng.integers(1, 3))
                        order[i], order[j] = order[j], order[i]
                    shuffled = tracking_scores(segs, order)
                    same = "the same" if abs(shuffled["recall"] - r["recall"]) < 1e-12 and shuffled["tracks"] == r["tracks"] else "DIFFERENT"
                    out.append(f"| masks, frames out of order | | | | {shuffled['recall']:.1%} | {shuffled['precision']:.1%} | "
                               f"{shuffled['f1']:.3f} | {shuffled['tf']:.3f} | {shuffled['ct']:.1%} | {shuffled['tracks']} | ({same} as in order) |")
                    print(out[-1], flush=True)
            out += ["", "Link recall: true frame-to-frame links (the same true cell segmented at t and t+1) whose two cells share a "
                    "track id. Link precision: the links the tracker made (gap links included) between two true cells that join "
                    "the same true cell. TF: mean share of a true track's frames that its most common track id covers. "
                    "CT: true tracks (two frames or more) followed by a single id. Classical segmentation: a segment is matched "
                    "to the true cell under its centroid (one segment per true cell).", ""]
        if "synthetic" not in a.skip:
            r = synthetic(a.timepoints, a.cells, work)
            es, er = r["ec50_smoothed"], r["ec50_raw"]

            def ec(e):
                return f"{e[0]:.2f} uM [{e[1]:.2f}, {e[2]:.2f}]" + ("" if e[3] else f" (not ok: {e[4]})")

            out += ["## Synthetic dose series (the demo's plate, the real service)", "",
                    f"{len(r) and r['cells']} cell observations on true cells, {r['tracks']} tracks, {a.timepoints} timepoints, "
                    f"8 wells (2 vehicle controls, 6 concentrations 0.1..30 uM), {a.cells} cells per well; {r['seconds']:.0f} s.", "",
                    "| measure | raw (per frame) | smoothed (one-way HMM) |", "|---|---|---|",
                    f"| per-cell state accuracy | {r['raw_acc']:.1%} | {r['smoothed_acc']:.1%} |",
                    f"| time-of-death error, mean abs (timepoints) | {r['tod_mae_raw_first_call']:.2f} (first dead call) | {r['tod_mae_smoothed']:.2f} ({r['tod_n']} cells; {r['tod_missed']} deaths missed) |",
                    f"| EC50 of the dead fraction at the last timepoint (t{r['last']}); generator {r['ec50_true']:.2f} uM | {ec(er)} | {ec(es)} |",
                    f"| EC50 error | {abs(er[0] / r['ec50_true'] - 1):.1%} | {abs(es[0] / r['ec50_true'] - 1):.1%} |", "",
                    f"For reference, the same fit on the dead fractions the generator drew (a perfect pipeline): {ec(r['ec50_drawn'])}, "
                    f"{abs(r['ec50_drawn'][0] / r['ec50_true'] - 1):.1%} from the generator's EC50 (whole cells per well cannot follow the curve exactly).", "",
                    f"Dead (+ necrotic) fraction per well at the last timepoint (t{r['last']}):", "",
                    "| well | uM | generator p(c) | true (cells drawn) | raw | smoothed | cells segmented | true cells |", "|---|---|---|---|---|---|---|---|"]
            out += [f"| {w} | {c:g} | {p:.3f} | {tf:.3f} | {rf:.3f} | {sf:.3f} | {n} | {nt} |" for w, c, p, tf, rf, sf, n, nt in r["wells"]]
            out.append("")
            print("\n".join(out[-20:]), flush=True)
        if "overhead" not in a.skip:
            sub = work / "overhead"
            sub.mkdir()
            r = overhead(sub)
            base = r["pipeline"] + r["sink"]
            track_extra = r["sink_tracks"] - r["sink"]
            out += ["## Overhead at 200 cells per frame (same run)", "",
                    f"Synthetic frames of {r['cells']:.0f} segmented cells, the demo pipeline (classical segmenter, EfficientNet-Lite0, "
                    "EWC-FAISS) on this machine's CPU; medians over 5 frames after a warm-up frame.", "",
                    "| step | s/frame | share of the frame |", "|---|---|---|",
                    f"| frame processing (process_frame) + per-cell sink, no tracking (baseline) | {base:.3f} | 100% |",
                    f"| tracking (the sink's write with tracking minus without) | {track_extra:.3f} | {track_extra / base:.1%} |",
                    f"| smoothing every track of the field (read + HMM) | {r['smoothing']:.3f} | {r['smoothing'] / base:.1%} |",
                    f"| tracking + smoothing | {track_extra + r['smoothing']:.3f} | {(track_extra + r['smoothing']) / base:.1%} |", ""]
            print("\n".join(out[-8:]), flush=True)
            sub = work / "long"
            sub.mkdir()
            lr = long_run(sub)
            extra = lr["tracks_fates"] - lr["plain"]
            out += ["Late in a long run: the per-cell sink at timepoints 91-100 of one field of 200 cells (no pipeline), medians:", "",
                    "| per-cell sink | s/frame | added to the baseline frame above |", "|---|---|---|",
                    f"| without tracking | {lr['plain']:.3f} | |",
                    f"| with tracking | {lr['tracks']:.3f} | {(lr['tracks'] - lr['plain']) / base:.1%} |",
                    f"| with tracking and the fates store (field smoothed again, fates.sqlite) | {lr['tracks_fates']:.3f} | {extra / base:.1%} |",
                    "", f"Tracking and smoothing stay under 10% of a frame as long as a frame takes more than {extra / 0.1:.1f} s "
                    "(at 200 cells, 100 timepoints into a field).", ""]
            print("\n".join(out[-10:]), flush=True)
    text = "\n".join(out) + "\n"
    if a.write:
        a.write.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
