"""The classical segmenter's speed, against its previous implementation in the same run, and its masks against that one's.

    .venv/bin/python bench/bench_segmenter_speed.py [--repeats 7] [--t98g-limit N] [--write bench/results/segmenter_speed.md]

Old: :mod:`bench._segmenter_baseline`, the implementation before the speed
work (commit a9df803) frozen verbatim, ``cells_from_labels`` included. New:
the plugin, through its ``segment(frame)`` (what the service's ``segment``
stage runs). The same frames, one after the other in the same process; times are medians after a warm-up run (numba's
compilation is in the warm-up, as in the service's start-up).

Frame sets:

* Lionheart size: one 1224 x 904 frame tiled from real livedead frames at
  0.7 um/px, built as ``bench/bench_presets.py`` builds it (its "segment s"
  column), segmented with ``config/livedead.toml``'s options (blob mode,
  hand-set rule) and with the classical defaults; ``--repeats`` runs each.
* t98g: the 37 phase-contrast frames (1022 x 1024, taken as 0.65 um/px, the
  classical defaults), once each; F1 of matched cells (IoU >= 0.5) against
  the instance masks, old and new.
* livedead: the 80 held-out frames (split as the end-to-end bench splits
  them), ``config/livedead.toml``'s options; F1 of the cells matched to the
  boxes (centroid in the box grown by 25%, :func:`monitor.segmentation.match_boxes`),
  old and new.
* qpi_cellphe: the 120 quantitative-phase frames (615 x 615, taken as 1.0
  um/px, the defaults: ``auto`` picks the intensity mode); no truth.

"F1 new vs old" pools the matches (IoU >= 0.5) of the new cells to the old
ones over the set's frames; "same" counts the frames whose label images are
identical. The load average (1 min) is read after each set: the machine is
shared, and a load above its core count inflates both columns alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import DATA, emit, need_data  # noqa: E402
from bench.bench_e2e_livedead import CONFIG, read_lab_config, split_frames, truth  # noqa: E402
from bench.bench_segmentation import load_t98g, match_instances  # noqa: E402

HEAD = ["frames", "options", "n", "size (px)", "old s/frame", "new s/frame", "speed-up", "F1 new vs old", "same",
        "F1 vs truth, old", "F1 vs truth, new", "cells/frame", "load avg"]

Segment = Callable[[np.ndarray, float], np.ndarray]


def segmenters(options: dict[str, Any]) -> tuple[Segment, Segment]:
    """(old, new): labels of an image at a pixel size, through the frozen baseline and through the plugin."""
    from cellmonitor_plugins.segmenters.classical import ClassicalSegmenter, Options

    from bench import _segmenter_baseline as baseline
    from monitor.records import Frame, FrameKey

    o = Options(**options)
    seg = ClassicalSegmenter(o)
    low = o.min_area_um2 if o.min_area_um2 is not None else 0.0

    def old(image: np.ndarray, um: float) -> np.ndarray:
        return baseline.cells_from_labels(baseline.segment_image(image, um, o), um, low, o.max_area_um2, o.exclude_border).labels

    def new(image: np.ndarray, um: float) -> np.ndarray:
        return seg.segment(Frame(FrameKey("bench", "-", "1", 0), {"p": image}, "p", None, um, "config", "bench")).labels

    return old, new


def timed(fn: Segment, image: np.ndarray, um: float) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    lab = fn(image, um)
    return lab, time.perf_counter() - t


def f1(stats: list[tuple[int, int, int]]) -> float:
    """Pooled F1 of (matches, n_true, n_pred) per frame."""
    tp = sum(s[0] for s in stats)
    return 2 * tp / max(1, sum(s[1] + s[2] for s in stats))


def box_stats(labels: np.ndarray, png: Path) -> tuple[int, int, int]:
    """(cells matched to boxes, boxes, cells) of one livedead frame."""
    from scipy import ndimage as ndi

    from monitor.segmentation import match_boxes

    _, boxes = truth(png)
    n = int(labels.max())
    cent = np.array(ndi.center_of_mass(labels > 0, labels, np.arange(1, n + 1)), dtype=np.float64).reshape(n, 2)
    return len(match_boxes(cent, np.asarray(boxes, dtype=np.float64).reshape(-1, 4))), len(boxes), n


def run_set(name: str, opt_name: str, options: dict[str, Any], frames: list[tuple[np.ndarray, Any]], um: float,
            repeats: int, score: Callable[[np.ndarray, Any], tuple[int, int, int]] | None) -> list[object]:
    """One table row: each frame segmented ``repeats`` times by old and new (interleaved), after a warm-up."""
    old, new = segmenters(options)
    old(frames[0][0], um)
    new(frames[0][0], um)
    t_old, t_new, vs_old, same, s_old, s_new, cells = [], [], [], 0, [], [], []
    for i, (img, gt) in enumerate(frames):
        for _ in range(repeats):
            a, ta = timed(old, img, um)
            b, tb = timed(new, img, um)
            t_old.append(ta)
            t_new.append(tb)
        tp, n_old, n_new, _ = match_instances(a, b) if a.max() and b.max() else (0, int(a.max()), int(b.max()), 0.0)
        vs_old.append((tp, n_old, n_new))
        same += bool(np.array_equal(a, b))
        cells.append(int(b.max()))
        if score is not None:
            s_old.append(score(a, gt))
            s_new.append(score(b, gt))
        print(f"\r  {name}, {opt_name}: frame {i + 1}/{len(frames)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    mo, mn = float(np.median(t_old)), float(np.median(t_new))
    shape = frames[0][0].shape
    return [name, opt_name, len(frames), f"{shape[1]} x {shape[0]}", mo, mn, f"{mo / mn:.2f}x", f1(vs_old), f"{same}/{len(frames)}",
            f1(s_old) if score else float("nan"), f1(s_new) if score else float("nan"), float(np.mean(cells)), os.getloadavg()[0]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="runs of each Lionheart-size frame (median)")
    ap.add_argument("--t98g-limit", type=int, default=None, help="only the first N t98g frames")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    need_data()
    from bench.bench_presets import lionheart_frame
    from monitor.index.dataset import read_image
    from monitor.report.classification import table

    um_ld, ld_options = read_lab_config(CONFIG)
    ld_train, ld_test = split_frames(DATA / "livedead")
    lion = lionheart_frame(ld_test + ld_train)  # the frame bench_presets times
    t98g = load_t98g(DATA, args.t98g_limit)
    rows = [
        run_set("Lionheart size, tiled livedead", "livedead.toml (blobs)", ld_options, [(lion, None)], um_ld, args.repeats, None),
        run_set("Lionheart size, tiled livedead", "defaults", {}, [(lion, None)], um_ld, args.repeats, None),
        run_set("t98g phase contrast", "defaults", {}, t98g, 0.65, 1, lambda lab, gt: match_instances(gt, lab)[:3]),
        run_set("livedead held-out", "livedead.toml (blobs)", ld_options, [(read_image(f), f) for f in ld_test], um_ld, 1, box_stats),
    ]
    qpi = sorted((DATA / "timelapse" / "qpi_cellphe").glob("*.tif"))
    if qpi:
        import tifffile

        rows.append(run_set("qpi_cellphe", "defaults (auto: intensity)", {}, [(tifffile.imread(f), None) for f in qpi], 1.0, 1, None))
    for r in rows:
        print(table(HEAD, [r]), flush=True)
    import cv2

    cmd = "python bench/bench_segmenter_speed.py" + (f" --repeats {args.repeats}" if args.repeats != 7 else "") + (
        f" --t98g-limit {args.t98g_limit}" if args.t98g_limit else "") + (f" --write {args.write}" if args.write else "")
    text = [
        "# Classical segmenter: speed and masks, old (commit a9df803) vs new",
        "",
        f"Command: `{cmd}` ({os.cpu_count()} CPU cores, OpenCV {cv2.getNumThreads()} threads, {time.strftime('%Y-%m-%d')}). "
        "Old: `bench/_segmenter_baseline.py` (the implementation before the speed work, frozen); new: the plugin. Both include "
        "`cells_from_labels` (the service's segment stage); the same frames, one after the other, in the same process; seconds are medians after a warm-up.",
        "",
        table(HEAD, rows),
        "",
        "F1 new vs old: matches at IoU >= 0.5 of the new cells to the old ones, pooled over the set; same: frames whose label "
        "images are identical. F1 vs truth: t98g, cells matched to the instance masks at IoU >= 0.5; livedead, cells matched to "
        "the boxes (centroid in the box grown by 25%). The load average (1 min) is read after each set; the machine is shared, "
        "and a load above its core count inflates both time columns.",
    ]
    emit(text, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
