"""Weight-free segmenter for phase-contrast, brightfield and quantitative-phase cells.

The method, on a working grid no finer than ``work_pixel_size_um`` (cells are
tens of um across; a coarser grid is faster and loses little):

1. Normalise (0.5/99.5 percentiles) and flatten the background by subtracting
   a wide Gaussian (``background_um``): uneven illumination and the halo of a
   well's wall go away. An empty field (constant, or noise only: fewer than a
   quarter of the smallest cell's area departs from the background by more than
   ``empty_snr`` x the pixel noise, floored at the quantisation step) is 0 cells
   at once; normalising it to the full range would only turn noise into cells.
2. Foreground. ``mode="contrast"`` (phase contrast, brightfield): the local
   standard deviation over ``contrast_um``, which is high in textured cells
   whatever their polarity and low on the flat background; measured on the
   input grid (``native_contrast``) because the fine granular texture of
   flat, spread cytoplasm does not survive downsampling.
   ``mode="intensity"`` (quantitative phase, refractive index, where a cell is
   a positive signal): the flattened image itself. Threshold at
   ``threshold_scale`` x Otsu, close (``close_um``), fill holes, open
   (``open_um``), drop specks below ``min_area_um2`` (default per mode:
   :data:`MIN_AREA_UM2`). ``mode="auto"`` (the default) picks ``intensity``
   when the background sits at the bottom of the grey range and
   ``contrast`` when it is mid-grey (:func:`resolve_mode`).
3. Seeds. In phase contrast, touching cells are separated by a thin bright
   halo: pixels brighter than ``halo_snr`` x the background noise are cut from
   the foreground (``halo_snr=0`` turns this off), the cut mask is opened
   (``halo_open_um``) and its distance transform, smoothed over
   ``seed_smooth_um``, gives one seed per h-maximum of height ``seed_h_um``
   (um). Seeds from a smoothed distance map rather than from raw peaks are what
   stops the spread, branched cells from shattering.
4. Marker-controlled watershed restricted to the foreground, on the elevation
   ``ridge_weight x halo brightness (in units of 10 x noise) - distance (in
   units of 10 um)``: boundaries follow the bright halos where there are some
   and the narrowest neck elsewhere. In ``intensity`` mode the sign of the
   brightness term is flipped (the gaps between cells are dark).
5. Optionally merge neighbours whose shared boundary is not brighter than
   ``merge_snr`` x noise (``merge_snr=0``: off), then filter by area in um^2
   and border contact and relabel 1..N (:func:`monitor.segmentation.cells_from_labels`).

Every length is in um and every area in um^2, so one configuration serves
the 0.19 um/px Nanolive and the 0.322 um/px Lionheart. The defaults were tuned
on four frames of a real phase-contrast time-lapse (T98G, Usiigaci example
data, taken as 0.65 um/px) and scored on all 37 and on the 33 held-out ones:
see ``bench/results/segmentation.md``.

The slow library steps (h-maxima, watershed, hole filling, peaks, line
openings, medians, region measurements) run through exact stand-ins
(:mod:`.morph`): the same labels, some 2-4x sooner
(``bench/results/segmenter_speed.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cellmonitor_plugins.segmenters.morph import median
from pydantic import BaseModel, ConfigDict, Field

from monitor.errors import BadInput, ConfigError
from monitor.protocols import BuildContext, SegmenterBase
from monitor.records import Cells, Frame, channel_key
from monitor.registry import plugin_spec
from monitor.segmentation import cells_from_labels

log = logging.getLogger(__name__)


#: default smallest cell per mode: phase-contrast debris specks reach a few hundred um^2
#: (tuned on t98g); quantitative-phase remnants of dead cells are a few tens of um^2;
#: blobs: a counting-chamber cell of ~14 um is ~150 um^2, debris below ~60 (tuned on livedead training frames)
MIN_AREA_UM2 = {"contrast": 350.0, "intensity": 20.0, "blobs": 60.0}
#: ``auto`` picks ``intensity`` when the background median sits this low in the 0.5-99.5 percentile range
AUTO_INTENSITY_BELOW = 0.2


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["auto", "contrast", "intensity", "blobs"] = Field(
        "auto",
        description="contrast: phase contrast/brightfield; intensity: quantitative phase / RI (cells bright); "
        "blobs: round cells of one size in a counting chamber (never picked by auto); auto: per image",
    )
    work_pixel_size_um: float = Field(0.8, gt=0, description="segment on a grid no finer than this (speed)")
    channel: str | None = Field(None, description="segment this channel (e.g. a nuclear stain, mode intensity) instead of the "
                                "frame's primary one; crops are still cut from the primary (label-free) channel")
    background_um: float = Field(15.0, gt=0, description="sigma of the background Gaussian")
    contrast_um: float = Field(0.35, gt=0, description="sigma of the local-contrast window")
    threshold_scale: float = Field(0.5, gt=0, description="multiplies the Otsu threshold of the foreground signal")
    native_contrast: bool = Field(True, description="measure contrast on the input grid, not the working grid")
    close_um: float = Field(2.0, ge=0)
    open_um: float = Field(2.0, ge=0)
    halo_snr: float = Field(10.0, ge=0, description="bright-halo cut, in background-noise units (0: off)")
    halo_smooth_um: float = Field(0.7, ge=0)
    halo_open_um: float = Field(2.0, ge=0)
    seed_smooth_um: float = Field(4.0, ge=0, description="sigma of the smoothing of the distance map for seeds")
    seed_h_um: float = Field(1.0, gt=0, description="h of the h-maxima seeds, in um of distance")
    ridge_weight: float = Field(2.0, ge=0, description="weight of the halo brightness in the watershed elevation")
    ridge_smooth_um: float = Field(2.0, ge=0)
    compactness: float = Field(0.0, ge=0)
    merge_snr: float = Field(0.0, ge=0, description="merge neighbours whose boundary is dimmer than this x noise (0: off)")
    min_area_um2: float | None = Field(
        None, ge=0, description=f"default: {MIN_AREA_UM2['contrast']} in contrast mode, {MIN_AREA_UM2['intensity']} in intensity mode"
    )
    max_area_um2: float = Field(20000.0, gt=0)
    exclude_border: bool = False
    # mode="blobs" only (plugins/segmenters/blobs.py; defaults tuned on livedead training frames at 0.7 um/px)
    cell_diameter_um: float = Field(14.0, gt=0, description="blobs: the expected cell diameter")
    blob_snr: float = Field(50.0, ge=0, description="blobs: smallest peak of the smoothed contrast, in units of the field's contrast MAD")
    seed_distance_um: float = Field(5.0, gt=0, description="blobs: the least distance between two cells' seeds")
    fg_snr: float = Field(8.0, ge=0, description="blobs: a cell's region is where the contrast exceeds this x MAD ...")
    fg_fraction: float = Field(0.15, ge=0, le=1, description="blobs: ... and this fraction of the cell's own peak")
    line_um: float = Field(40.0, ge=0, description="blobs: remove straight structures longer than this (chamber ruling; 0: off)")
    line_angles: int = Field(12, ge=1, le=90, description="blobs: orientations tried for the line removal")
    min_dark: float = Field(0.25, ge=0, description="blobs: a cell's darkest flattened value is below -this (of the 0.5-99.5 percentile range)")
    min_dark_body: float = Field(
        0.2, ge=0, description="blobs: a tenth of a cell's area is darker than -this (a dark speck on a ghost is not a dark part)"
    )
    min_solidity: float = Field(0.8, ge=0, le=1, description="blobs: smallest area / convex-hull area")
    max_axis_ratio: float = Field(1.8, ge=1, description="blobs: longest / shortest axis of a cell not cut by the frame edge")
    border_um: float = Field(4.2, ge=0, description="blobs: a cell cut by the frame edge counts when its centroid is this far inside")
    acceptance: Path | None = Field(
        None,
        description="blobs: a learned acceptance model (JSON written by `cellmonitor segment-fit` from boxed frames) "
        "replacing the hand-set rule above (min_dark ... border_um; min_area_um2 and max_area_um2 still apply); "
        "relative to the config file",
    )
    empty_snr: float = Field(
        8.0, ge=0, description="a field with less than a quarter of the smallest cell's area departing from the background by this x noise is empty (0 cells); 0: off"
    )


def resolve_mode(mode: str, background_level: float) -> str:
    """``auto``: ``intensity`` when the background (the median) lies in the lowest
    ``AUTO_INTENSITY_BELOW`` of the 0.5-99.5 percentile range (quantitative phase,
    refractive index: cells are a positive signal on the darkest level), else
    ``contrast`` (phase contrast, brightfield: a mid-grey background)."""
    if mode != "auto":
        return mode
    return "intensity" if background_level < AUTO_INTENSITY_BELOW else "contrast"


def min_area_um2(o: Options, mode: str) -> float:
    """The configured smallest cell, or the mode's default (:data:`MIN_AREA_UM2`)."""
    return o.min_area_um2 if o.min_area_um2 is not None else MIN_AREA_UM2[mode]


def _disk(radius_px: float) -> np.ndarray:
    import cv2

    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img, (0, 0), sigma_px) if sigma_px > 0 else img


def _background(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """A wide Gaussian, computed on a grid decimated to ~sigma/4 (the result is smooth anyway)."""
    from monitor.imaging import resize

    k = int(sigma_px // 4)
    if k < 2:
        return _blur(img, sigma_px)
    h, w = img.shape
    small = resize(img, (max(1, h // k), max(1, w // k)))
    return resize(_blur(small, sigma_px / k), (h, w))


def pixel_noise(flat: np.ndarray, floor: float) -> float:
    """Robust noise of a flattened image from neighbour differences (MAD / sqrt 2),
    insensitive to structure wider than a pixel; at least ``floor`` (the quantisation step)."""
    d = np.diff(flat[::2], axis=1).ravel() if flat.shape[1] > 1 else flat.ravel()
    if d.size == 0:
        return floor
    mad = float(median(np.abs(d - median(d))))
    return max(1.4826 * mad / np.sqrt(2.0), floor, 1e-6)


def is_empty_field(flat: np.ndarray, noise: float, snr: float, min_px: float) -> bool:
    """True when fewer than a quarter of the smallest cell's pixels (``min_px``)
    depart from the background (the median) by more than ``snr`` x ``noise``:
    a flat, featureless or noise-only field, which holds no cell."""
    if snr <= 0:
        return False
    dev = np.abs(flat - np.float32(median(flat)))
    return int(np.count_nonzero(dev > snr * noise)) < 0.25 * min_px


def merge_weak_boundaries(labels: np.ndarray, edge: np.ndarray, threshold: float) -> np.ndarray:
    """Merge touching regions whose shared boundary has a mean ``edge`` value below ``threshold``.

    The weakest boundaries merge first (union-find); a boundary pixel pair
    scores the larger of its two ``edge`` values.
    """
    lab = labels.astype(np.int64, copy=False)
    a = np.concatenate([lab[:, :-1].ravel(), lab[:-1, :].ravel()])
    b = np.concatenate([lab[:, 1:].ravel(), lab[1:, :].ravel()])
    e = np.concatenate(
        [np.maximum(edge[:, :-1], edge[:, 1:]).ravel(), np.maximum(edge[:-1, :], edge[1:, :]).ravel()]
    )
    m = (a != b) & (a > 0) & (b > 0)
    if not m.any():
        return labels
    n = int(lab.max()) + 1
    code = np.minimum(a[m], b[m]) * n + np.maximum(a[m], b[m])
    pairs, inv = np.unique(code, return_inverse=True)
    mean = np.bincount(inv, weights=e[m]) / np.bincount(inv)
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    for k in np.argsort(mean):
        if mean[k] >= threshold:
            break
        x, y = find(int(pairs[k] // n)), find(int(pairs[k] % n))
        if x != y:
            parent[y] = x
    roots = np.array([find(i) for i in range(n)])
    return roots[lab].astype(labels.dtype, copy=False)


def _prepare(image: np.ndarray, pixel_size_um: float, o: Options) -> tuple[Any, ...] | None:
    """Step 1: (input image, working image, its flattened form, background, mode, working um/px, smallest cell in working px, lo, hi);
    None for an image with no range or an empty field (0 cells)."""
    from monitor.imaging import resize, to_float

    img0 = np.ascontiguousarray(to_float(image), dtype=np.float32)
    shape0 = img0.shape
    work = max(o.work_pixel_size_um, pixel_size_um)
    f = pixel_size_um / work
    img = img0
    if f < 0.999:
        img = resize(img0, (max(1, round(shape0[0] * f)), max(1, round(shape0[1] * f))))
    if not np.issubdtype(np.asarray(image).dtype, np.integer) and not np.isfinite(img).all():  # integers always are
        img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
        img0 = np.nan_to_num(img0, nan=0.0, posinf=0.0, neginf=0.0)
    lo, med, hi = (float(v) for v in np.percentile(img[::2, ::2], [0.5, 50, 99.5]))
    if not hi > lo:
        return None
    mode = resolve_mode(o.mode, (med - lo) / (hi - lo))
    img = (img - lo) / (hi - lo)
    bg = _background(img, o.background_um / work)
    flat = img - bg
    min_px = min_area_um2(o, mode) / work**2
    # a (nearly) flat field: normalising it to the full range would turn its noise into "cells"
    # (and the foreground into the whole field, whose distance map has no end): 0 cells at once
    step = 0.3 / (hi - lo) if np.issubdtype(np.asarray(image).dtype, np.integer) else 0.0
    if is_empty_field(flat, pixel_noise(flat, step), o.empty_snr, min_px):
        return None
    return img0, img, flat, bg, mode, work, min_px, lo, hi


def blob_candidates_on(image: np.ndarray, pixel_size_um: float, o: Options, snr: float) -> tuple[list[Any], np.ndarray]:
    """The blob mode's candidate cells of an image (steps 1-5 of :mod:`.blobs`) at seed threshold ``snr``,
    and their centroids (y, x) on the image's own grid; what ``segment-fit`` labels against boxes."""
    from cellmonitor_plugins.segmenters.blobs import blob_candidates

    prep = _prepare(image, pixel_size_um, o)
    if prep is None:
        return [], np.zeros((0, 2))
    img0, _, flat, _, _, work, _, _, _ = prep
    cands = blob_candidates(flat, work, o, snr)
    sy, sx = img0.shape[0] / flat.shape[0], img0.shape[1] / flat.shape[1]
    cent = [((c.box[0].start + ys.mean() + 0.5) * sy - 0.5, (c.box[1].start + xs.mean() + 0.5) * sx - 0.5)
            for c in cands for ys, xs in [np.nonzero(c.mask)]]
    return cands, np.array(cent, dtype=np.float64).reshape(-1, 2)


def segment_image(image: np.ndarray, pixel_size_um: float, o: Options, acceptance: Any = None) -> np.ndarray:
    """Instance labels (int32, 0 = background) of a 2-D image on its own pixel grid.

    The steps and their policy are described in the module docstring; the
    image is processed on a grid no finer than ``o.work_pixel_size_um`` and
    the labels are mapped back by nearest neighbour. ``acceptance``: a
    learned blob acceptance model (mode ``blobs`` only).
    """
    import cv2
    from cellmonitor_plugins.segmenters.morph import fill_holes, h_maxima, watershed
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from monitor.imaging import resize

    shape0 = np.shape(image)[:2]
    prep = _prepare(image, pixel_size_um, o)
    if prep is None:
        return np.zeros(shape0, np.int32)
    img0, img, flat, bg, mode, work, min_px, lo, hi = prep
    shape0 = img0.shape
    empty = np.zeros(shape0, np.int32)
    if mode == "blobs":
        from cellmonitor_plugins.segmenters.blobs import blob_labels

        return resize(blob_labels(img, flat, work, o, min_px, acceptance), shape0, labels=True)

    if mode == "contrast" and o.native_contrast and img.shape != shape0:
        # fine texture of spread cytoplasm lives at the native resolution
        nflat = (img0 - lo) / (hi - lo) - resize(bg, shape0)
        s = o.contrast_um / pixel_size_um
        mean = _blur(nflat, s)
        signal = resize(np.sqrt(np.clip(_blur(nflat * nflat, s) - mean * mean, 0, None)), img.shape)
    elif mode == "contrast":
        s = o.contrast_um / work
        mean = _blur(flat, s)
        signal = np.sqrt(np.clip(_blur(flat * flat, s) - mean * mean, 0, None))
    else:
        signal = _blur(flat, o.contrast_um / work)
    if not float(signal.max()) > float(signal.min()):
        return empty
    t = float(threshold_otsu(signal)) * o.threshold_scale
    fg: np.ndarray = (signal > t).astype(np.uint8)
    if o.close_um > 0:
        fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, _disk(o.close_um / work))
    fg = fill_holes(fg).astype(np.uint8)
    if o.open_um > 0:
        fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, _disk(o.open_um / work))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    fgb = keep[comp]
    if not fgb.any():
        return empty

    # background noise of the flattened image (robust), the unit of every brightness option
    bgv = flat[~fgb] if (~fgb).sum() > 100 else flat.ravel()
    noise = max(float(1.4826 * median(np.abs(bgv - median(bgv)))), 1e-6)
    sign = 1.0 if mode == "contrast" else -1.0

    seed_src = fgb.astype(np.uint8)
    if mode == "contrast" and o.halo_snr > 0:
        halo = _blur(flat, o.halo_smooth_um / work) > o.halo_snr * noise
        seed_src = (fgb & ~halo).astype(np.uint8)
        if o.halo_open_um > 0:
            seed_src = cv2.morphologyEx(seed_src, cv2.MORPH_OPEN, _disk(o.halo_open_um / work))
    dist = cv2.distanceTransform(seed_src, cv2.DIST_L2, 5) * work  # um
    # with no background pixel at all the transform is "infinite" (and h-maxima on it never
    # ends): bound it by the field's size, so every later step sees finite values
    np.minimum(dist, float(sum(dist.shape)) * work, out=dist)
    dist = _blur(dist, o.seed_smooth_um / work)
    # h-maxima (a grey reconstruction) dominates the run time: find them on a
    # grid of about a third of the seed smoothing, which that smoothing makes lossless enough
    seed_grid = max(work, o.seed_smooth_um / 3)
    if seed_grid > work * 1.25:
        small = (max(1, round(dist.shape[0] * work / seed_grid)), max(1, round(dist.shape[1] * work / seed_grid)))
        peaks = resize(h_maxima(resize(dist, small), o.seed_h_um).astype(np.uint8), dist.shape, labels=True) > 0
    else:
        peaks = h_maxima(dist, o.seed_h_um) > 0
    markers, _ = ndi.label(peaks & fgb)
    ridge = sign * _blur(flat, o.ridge_smooth_um / work) / (10.0 * noise)
    elevation = o.ridge_weight * ridge - 0.1 * dist
    if o.compactness > 0:
        from skimage.segmentation import watershed as compact_watershed

        labels = compact_watershed(elevation, markers, mask=fgb, compactness=o.compactness).astype(np.int32)
    else:
        labels = watershed(elevation, markers, fgb).astype(np.int32)
    # foreground blobs that got no seed (all halo) are cells of their own
    orphans, k = ndi.label(fgb & (labels == 0))
    if k:
        labels[orphans > 0] = orphans[orphans > 0] + labels.max()
    if o.merge_snr > 0:
        labels = merge_weak_boundaries(labels, sign * _blur(flat, o.halo_smooth_um / work) / noise, o.merge_snr)
    # watershed pieces below the smallest cell are specks or slivers, not cells
    sizes = np.bincount(labels.ravel())
    tiny = sizes < min_px
    tiny[0] = False
    if tiny.any():
        labels[tiny[labels]] = 0
    return resize(labels, shape0, labels=True)


def load_acceptance(o: Options, ctx: BuildContext) -> Any:
    """The configured acceptance model (None when not set), checked against the options; one-line ConfigError otherwise."""
    if o.acceptance is None:
        return None
    from cellmonitor_plugins.segmenters.acceptance import AcceptanceModel
    from cellmonitor_plugins.segmenters.blobs import FEATURES

    if o.mode != "blobs":
        raise ConfigError(f"segmenter.options.acceptance: a blob acceptance model is for mode = \"blobs\" (this config has mode = {o.mode!r})")
    path = Path(o.acceptance).expanduser()
    if not path.is_absolute() and ctx.config_path is not None:
        path = Path(ctx.config_path).parent / path
    model = AcceptanceModel.load(path, FEATURES)
    model.check_options(o, f"acceptance model {path}")
    return model


def check_acceptance(o: Options, ctx: BuildContext) -> None:
    """What ``check-config`` checks: the configured acceptance model loads and fits the options."""
    load_acceptance(o, ctx)


class ClassicalSegmenter(SegmenterBase):
    """The weight-free default segmenter (see the module docstring)."""

    name = "classical"

    def __init__(self, options: Options, acceptance: Any = None):
        self.o = options
        self.acceptance = acceptance
        self._grid_warned = False

    def channel_of(self, frame: Frame) -> Any:
        """The plane segmented: ``channel`` when configured (case and spaces aside), else the primary.

        Raises
        ------
        BadInput
            The frame has no such channel (one line naming the frame's file).
        """
        if self.o.channel is None:
            return frame.image
        want = channel_key(self.o.channel)
        for name, img in frame.channels.items():
            if channel_key(name) == want:
                return img
        raise BadInput(frame.sources[0] if frame.sources else frame.key,
                       f"segmenter.options.channel {self.o.channel!r} is not in this frame (channels: {', '.join(frame.channels)})")

    def segment(self, frame: Frame) -> Cells:
        """Segment the primary channel (or ``channel``); areas and border filtered on the frame's own grid."""
        o = self.o
        if self.acceptance is not None and not self._grid_warned:
            fitted = self.acceptance.fitted.get("work_um")
            work = max(o.work_pixel_size_um, frame.pixel_size_um)
            if fitted and abs(work / float(fitted) - 1) > 0.01:
                self._grid_warned = True
                log.warning("segmenter classical: the acceptance model was fitted on a %.3g um/px working grid, frames are segmented "
                            "on %.3g um/px (pipeline.pixel_size_um changed?): its features mean something else; refit it "
                            "with `cellmonitor segment-fit`", float(fitted), work)
        labels = segment_image(self.channel_of(frame), frame.pixel_size_um, o, self.acceptance)
        # the mode's default speck limit applied on the working grid (hand-set rules); this applies
        # the configured one (if any) exactly, on the frame's own grid, under any rule
        low = o.min_area_um2 if o.min_area_um2 is not None else 0.0
        return cells_from_labels(labels, frame.pixel_size_um, low, o.max_area_um2, o.exclude_border)


PLUGIN = plugin_spec(
    "classical", "weight-free: flattened local contrast, halo-cut distance seeds, marker watershed (um units)", Options,
    lambda o, ctx: ClassicalSegmenter(o, load_acceptance(o, ctx)),
    check=check_acceptance,
)
