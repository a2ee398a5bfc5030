"""Segmentation benchmark on real time-lapses (not a test).

t98g_phase: 37 phase-contrast frames (1022x1024) with per-frame instance
masks. Per segmenter: F1 of matched cells at IoU >= 0.5 (a match above 0.5 is
unique, so no assignment is needed), mean IoU of the matches, and seconds per
frame (median, after one warm-up frame). F1 is reported on all frames, on the
frames the defaults were tuned on, and on the held-out rest, with the ratio to
the first untuned version. qpi_cellphe: cell counts over its 120 frames (no
masks; with ``--images DIR`` overlays are written there to judge by eye: outside the
repository, since they carry the shared data's pixels).

Pixel sizes are not stored in these files: t98g is taken as 0.65 um/px and
qpi_cellphe as 1.0 um/px (options ``--t98g-um`` / ``--qpi-um``). Segmenters
run on the native grid of each frame (the pipeline's rescale is not part of
the timing).

    .venv/bin/python -m bench.bench_segmentation --write bench/results/segmentation.md

Optional: ``--sam-checkpoint PATH`` adds SAM with real weights;
``--sam-random vit_b`` times SAM's real architecture with random weights on
one frame (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
#: the frames (0-based, t01 = 0) the classical defaults were tuned on; the rest are held out
TUNE_FRAMES = (0, 9, 18, 27)


def match_instances(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, int, int, float]:
    """(true positives, n_gt, n_pred, mean IoU of the matches) at IoU > ``iou_threshold``.

    With a threshold of at least 0.5 a cell can match at most one instance, so
    counting pairs above it is the optimal matching.
    """
    gt = np.asarray(gt, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    _, gt = np.unique(gt, return_inverse=True)
    _, pred = np.unique(pred, return_inverse=True)
    gt, pred = gt.reshape(-1), pred.reshape(-1)
    ng, npr = int(gt.max()) + 1, int(pred.max()) + 1
    c = np.bincount(gt * npr + pred, minlength=ng * npr).reshape(ng, npr)
    # index 0 is background only if the image has background (true for these data)
    inter = c[1:, 1:].astype(np.float64)
    union = c.sum(1)[1:, None] + c.sum(0)[None, 1:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    m = iou > iou_threshold
    tp = int(m.sum())
    return tp, ng - 1, npr - 1, float(iou[m].mean()) if tp else 0.0


def untuned_v0(image: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """The first, untuned classical segmenter, frozen here as the baseline row.

    Otsu on local contrast of the flattened image, fill, open, distance
    peaks 6 um apart, watershed on the distance (commit 65a7281).
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    from monitor.imaging import to_float
    from monitor.segmentation import cells_from_labels

    um = pixel_size_um
    img = to_float(image)
    img = (img - img.min()) / (img.max() - img.min())
    flat = img - gaussian(img, 30.0 / um)
    flat = gaussian(flat, 1.0 / um)
    w = 2.0 / um
    mean = gaussian(flat, w)
    contrast = np.sqrt(np.clip(gaussian(flat * flat, w) - mean * mean, 0, None))
    fg = ndi.binary_fill_holes(contrast > threshold_otsu(contrast))
    fg = ndi.binary_opening(fg, iterations=max(1, int(round(0.5 / um))))
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=max(1, int(round(6.0 / um))), labels=ndi.label(fg)[0], exclude_border=False)
    markers = np.zeros(img.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    return cells_from_labels(labels, um, 20.0, 20000.0).labels


def classical(**options: object) -> Callable[[np.ndarray, float], np.ndarray]:
    """The classical plugin with these options, through its ``segment(frame)``."""
    from cellmonitor_plugins.segmenters.classical import PLUGIN

    from monitor.protocols import BuildContext
    from monitor.records import Frame, FrameKey

    seg = PLUGIN.build(PLUGIN.Options(**options), BuildContext(state_dir=Path(".")))

    def run(image: np.ndarray, pixel_size_um: float) -> np.ndarray:
        frame = Frame(FrameKey("bench", "-", "1", 0), {"p": image}, "p", None, pixel_size_um, "config", "bench")
        return seg.segment(frame).labels

    return run


#: intermediate variants on the way to the default, kept as baselines
V1_CONTRAST_HMAX = dict(
    native_contrast=False, background_um=25.0, contrast_um=1.0, open_um=4.0, halo_snr=0.0, ridge_weight=0.0,
    seed_smooth_um=3.0, seed_h_um=2.0, min_area_um2=150.0, work_pixel_size_um=1.0,
)
V2_HALO = dict(
    native_contrast=False, background_um=25.0, contrast_um=0.6, open_um=4.0, halo_snr=10.0, halo_open_um=1.0,
    ridge_weight=1.0, seed_smooth_um=3.0, seed_h_um=2.0, min_area_um2=150.0, work_pixel_size_um=1.0,
)
#: the best of a random search over the options, scored on the tuned frames only: it overfits them
SEARCHED = dict(work_pixel_size_um=0.65, background_um=20.0, halo_open_um=1.0, min_area_um2=450.0)
QPI_OPTIONS: dict[str, object] = {}  # the defaults: auto mode picks "intensity" on these frames


NOTES = """\
Notes

- Pixel sizes are assumptions (not stored in the files): t98g 0.65 um/px, qpi_cellphe 1.0 um/px.
  Every classical option is in um / um^2, so a different true pixel size shifts, not breaks, the result.
- The classical defaults were hand-tuned on the tuned frames only; a random search over the options
  from there (again scored on the tuned frames only) raised their F1 but not the held-out F1, so the
  simpler, faster hand-tuned setting stays the default. The held-out column is the honest number. Seconds per frame are the median on the
  native 1022x1024 grid, after one warm-up frame, on this 2-core machine while other jobs shared it.
- Where the F1 goes (tuned frames, default): about 70% of true cells match; the misses are mostly cells
  whose faint, flat lamellipodia are not in the foreground (the prediction covers under half of the
  true mask) and touching cells with no bright halo between them (merged). Tried and rejected on the
  tuned frames: Otsu on smoothed local contrast (v1), seeds from smoothed-contrast maxima, seeds from the
  halo-cut components, hysteresis thresholds, larger closing, merging regions across dim boundaries,
  merging small fragments into their main neighbour: none above the default.
- F1 >= 0.80 was not reached without trained weights. SAM (plugin `sam`) needs its checkpoint; with
  real weights run this bench with `--sam-checkpoint`.
"""


@dataclass
class Row:
    name: str
    f1_all: float
    f1_tune: float
    f1_held: float
    iou: float
    s_per_frame: float
    n_pred: float


def _f1(stats: Sequence[tuple[int, int, int, float]]) -> float:
    tp = sum(s[0] for s in stats)
    return 2 * tp / max(1, sum(s[1] + s[2] for s in stats))


def load_t98g(data: Path, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    import imageio.v3 as iio
    import tifffile

    root = data / "timelapse" / "t98g_phase"
    frames = sorted((root / "frames").glob("*.tif"))
    masks = sorted((root / "masks").glob("id_masks_*.png"))
    if not frames or len(frames) != len(masks):
        raise SystemExit(f"t98g data not found or frames/masks differ at {root}")
    pairs = list(zip(frames, masks, strict=True))[: limit or None]
    return [(tifffile.imread(f), iio.imread(m)) for f, m in pairs]


def bench_one(
    name: str, fn: Callable[[np.ndarray, float], np.ndarray], data: list[tuple[np.ndarray, np.ndarray]], um: float
) -> tuple[Row, list[np.ndarray]]:
    fn(data[0][0], um)  # warm-up: imports, caches
    stats, times, preds = [], [], []
    for i, (img, gt) in enumerate(data):
        t = time.perf_counter()
        lab = fn(img, um)
        times.append(time.perf_counter() - t)
        stats.append(match_instances(gt, lab))
        preds.append(lab)
        print(f"\r  {name}: frame {i + 1}/{len(data)} ({times[-1]:.2f} s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tune = [s for i, s in enumerate(stats) if i in TUNE_FRAMES]
    held = [s for i, s in enumerate(stats) if i not in TUNE_FRAMES]
    tp = [s for s in stats if s[0]]
    iou = sum(s[3] * s[0] for s in tp) / max(1, sum(s[0] for s in tp))
    row = Row(name, _f1(stats), _f1(tune), _f1(held), iou, float(np.median(times)), float(np.mean([s[2] for s in stats])))
    return row, preds


def overlay(
    image: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None, scale: float = 0.5, high_pct: float = 99.5
) -> np.ndarray:
    """uint8 RGB: predicted boundaries green, true boundaries red (if given), downscaled by ``scale``."""
    from skimage.segmentation import find_boundaries

    from monitor.imaging import display_range, resize

    h, w = image.shape[:2]
    shape = (round(h * scale), round(w * scale))
    rgb = resize(display_range(image, 0.5, high_pct), shape).copy()
    if truth is not None:
        rgb[find_boundaries(resize(truth, shape, labels=True), mode="inner")] = GT_RGB
    rgb[find_boundaries(resize(labels, shape, labels=True), mode="inner")] = PRED_RGB
    return rgb


GT_RGB = (255, 40, 40)
PRED_RGB = (40, 255, 40)


def save_png(path: Path, rgb: np.ndarray, grey_levels: int = 32) -> None:
    """A small palette PNG for a README: ``grey_levels`` greys plus the two boundary colours."""
    from PIL import Image

    grey = rgb.astype(np.float32).mean(axis=2)
    idx = np.round(grey / 255 * (grey_levels - 1)).astype(np.uint8)
    idx[(rgb == GT_RGB).all(axis=2)] = grey_levels
    idx[(rgb == PRED_RGB).all(axis=2)] = grey_levels + 1
    palette = [round(v) for i in range(grey_levels) for v in [i * 255 / (grey_levels - 1)] * 3]
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette + list(GT_RGB) + list(PRED_RGB))
    im.save(path, optimize=True)


def bench_qpi(data: Path, um: float, images: Path | None) -> list[str]:
    import tifffile

    files = sorted((data / "timelapse" / "qpi_cellphe").glob("*.tif"))
    if not files:
        return ["qpi_cellphe not found: skipped"]
    fn = classical(**QPI_OPTIONS)
    counts, times = [], []
    for i, f in enumerate(files):
        img = tifffile.imread(f)
        t = time.perf_counter()
        lab = fn(img, um)
        times.append(time.perf_counter() - t)
        counts.append(int(lab.max()))
        print(f"\r  qpi_cellphe: frame {i + 1}/{len(files)}: {counts[-1]} cells", end="", file=sys.stderr, flush=True)
        if images is not None and i in (0, len(files) - 1):
            save_png(images / f"seg_qpi_cellphe_{i + 1:03d}.png", overlay(img, lab, scale=1.0, high_pct=99.99))
    print(file=sys.stderr)
    c = np.array(counts)
    lines = [
        f"qpi_cellphe, classical {QPI_OPTIONS or '(defaults)'} at {um} um/px, {len(c)} frames: cells per frame "
        f"min {c.min()}, median {int(np.median(c))}, max {c.max()}; first {c[0]}, last {c[-1]}; "
        f"{np.median(times):.3f} s/frame (615x615)",
        "counts every 10th frame: " + " ".join(str(x) for x in c[::10]),
    ]
    return lines


def bench_sam_random(model_type: str, image: np.ndarray, um: float, points_per_side: int) -> str:
    """Seconds for one frame through SamSegmenter with random weights of the real architecture."""
    import torch
    from cellmonitor_plugins.segmenters.sam import Options, SamSegmenter
    from segment_anything import sam_model_registry

    from monitor.device import resolve_device
    from monitor.records import Frame, FrameKey

    device = resolve_device("auto")
    model = sam_model_registry[model_type](checkpoint=None).to(device).eval()
    seg = SamSegmenter(Options(model_type=model_type, points_per_side=points_per_side), model, device)
    frame = Frame(FrameKey("bench", "-", "1", 0), {"p": image}, "p", None, um, "config", "bench")
    t = time.perf_counter()
    seg.segment(frame)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return f"SAM {model_type}, random weights, {points_per_side}x{points_per_side} points, {device}: {dt:.1f} s for one {image.shape[1]}x{image.shape[0]} frame"


def table(rows: list[Row], n_frames: int) -> list[str]:
    base = rows[0]
    n_tune = sum(1 for i in TUNE_FRAMES if i < n_frames)
    out = [
        f"| segmenter | F1 all ({n_frames}) | F1 tuned ({n_tune}) | F1 held-out ({n_frames - n_tune}) "
        "| x baseline (held-out) | mean IoU | s/frame | cells/frame |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.f1_held / base.f1_held if base.f1_held else float("nan")
        out.append(
            f"| {r.name} | {r.f1_all:.3f} | {r.f1_tune:.3f} | {r.f1_held:.3f} | {ratio:.2f} | {r.iou:.3f} | "
            f"{r.s_per_frame:.3f} | {r.n_pred:.1f} |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--t98g-um", type=float, default=0.65)
    ap.add_argument("--qpi-um", type=float, default=1.0)
    ap.add_argument("--limit", type=int, help="only the first N t98g frames (quick look)")
    ap.add_argument("--images", type=Path, default=None, help="write overlay PNGs here (outside the repository: they show the shared data)")
    ap.add_argument("--no-qpi", action="store_true")
    ap.add_argument("--sam-checkpoint", type=Path, help="add SAM (vit_h unless --sam-model) with these weights")
    ap.add_argument("--sam-model", default="vit_h")
    ap.add_argument("--sam-random", metavar="MODEL_TYPE", help="time SAM's architecture with random weights on one frame")
    ap.add_argument("--sam-points", type=int, default=32)
    ap.add_argument("--write", type=Path, help="also write the results as markdown here")
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    images = args.images
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
    print(f"loading t98g from {args.data} ...", file=sys.stderr)
    data = load_t98g(args.data, args.limit)
    segmenters: list[tuple[str, Callable[[np.ndarray, float], np.ndarray]]] = [
        ("untuned v0 (baseline)", untuned_v0),
        ("v1: contrast + distance h-maxima", classical(**V1_CONTRAST_HMAX)),
        ("v2: + halo cut, ridge watershed", classical(**V2_HALO)),
        ("random search on the tuned frames", classical(**SEARCHED)),
        ("classical (default: v2 + native-grid contrast, hand-tuned)", classical()),
    ]
    if args.sam_checkpoint:
        from cellmonitor_plugins.segmenters.sam import PLUGIN as SAM

        from monitor.protocols import BuildContext

        seg = SAM.build(SAM.Options(model_type=args.sam_model, checkpoint=args.sam_checkpoint), BuildContext(Path("."), device="auto"))

        def sam_fn(img: np.ndarray, um: float) -> np.ndarray:
            from monitor.records import Frame, FrameKey

            return seg.segment(Frame(FrameKey("b", "-", "1", 0), {"p": img}, "p", None, um, "config", "b")).labels

        segmenters.append((f"sam {args.sam_model}", sam_fn))
    rows = []
    for name, fn in segmenters:
        row, preds = bench_one(name, fn, data, args.t98g_um)
        rows.append(row)
        if images is not None and name.startswith("classical"):
            for i in (5, len(data) - 1):
                if i < len(data) and i not in TUNE_FRAMES:
                    save_png(images / f"seg_t98g_t{i + 1:02d}.png", overlay(data[i][0], preds[i], data[i][1]))
    lines = [
        f"t98g_phase, {len(data)} frames of 1022x1024 at {args.t98g_um} um/px; tuned on frames "
        f"{', '.join(f't{i + 1:02d}' for i in TUNE_FRAMES)}, held out: the rest. F1 at IoU >= 0.5.",
        "",
        *table(rows, len(data)),
    ]
    if not args.no_qpi:
        lines += ["", *bench_qpi(args.data, args.qpi_um, images)]
    if args.sam_random:
        lines += ["", bench_sam_random(args.sam_random, data[0][0], args.t98g_um, args.sam_points)]
    print("\n".join(lines))
    if args.write:
        cmd = "python -m bench.bench_segmentation " + " ".join(argv if argv is not None else sys.argv[1:])
        cpu = f"{os.cpu_count()} CPU cores"
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(
            "# Segmentation benchmark\n\n"
            f"Produced by `{cmd.strip()}` (run from the repository root, {cpu}, "
            f"{time.strftime('%Y-%m-%d')}).\n\n" + "\n".join(lines) + "\n\n" + NOTES
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
