"""Nucleus morphology: 75 hand-made measurements of each cell in its frame's label-free channel.

What a dying cell looks like in brightfield, measured instead of learned: a
calibration run gives hundreds of marker-labelled cells, too few to teach a
network what changes, enough to weigh a few dozen named measurements. The
encoder embeds each cell in its frame (a :class:`monitor.protocols.FrameEncoder`):
the segmentation's mask says where the cell is (a nuclear mask from another
tool, or the classical segmenter on a nuclear stain), the label-free channel
says what it looks like.

Grey levels are referenced to the field's background: ``g = (x - median) /
MAD`` of every pixel outside every mask, so fields of another exposure or
lamp give the same numbers. Six regions per cell: the mask, its core (eroded
by 1 um), its inner edge, and three rings outside it (0-1.5, 1.5-4, 4-8 um;
the outermost one leaves other cells' pixels out). In each region
eleven statistics of ``g``: mean, standard deviation, 5th and 95th
percentiles, mean Sobel gradient, mean absolute Laplacian of Gaussian
(sigma 1 px), mean and mean absolute LoG (sigma 2.5 px), mean 5 x 5 local
standard deviation, mean absolute and standard deviation of the high-pass
``g - G_4px(g)``. Then the mask's shape: log area (um^2), perimeter (um),
circularity, solidity, eccentricity, major and minor axis (um), whether it
touches the frame's edge, and how crowded its surroundings are (share of the
0-4 um ring in other cells' masks). 6 x 11 + 9 = 75 values.

The raw measurements are on very different scales: the index standardises
them, and ``config/mcf7_pi.toml`` conditions them with the learned logistic
projection (:mod:`monitor.index.condition`) fitted at ``index build
--from-marker``. On the shared brightfield + PI fields this set beat a frozen
and a fine-tuned EfficientNet-Lite0 in a cross-validation by experiment on
the training experiments (docs/benchmarks.md, "Label-free death").

Crops without a frame (the service's warm-up) are measured as small frames
whose cell is the central disc of a quarter of the crop's side; reference sets of
single-cell crops carry no masks and are not what this encoder is for (build
its references with ``index build --from-marker``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from monitor.protocols import BuildContext, EncoderBase
from monitor.registry import plugin_spec

VERSION = 1
REGIONS = ("mask", "core", "edge", "ring0-1.5um", "ring1.5-4um", "ring4-8um")
STATS = ("mean", "std", "p5", "p95", "gradient", "abs_log1", "log2.5", "abs_log2.5", "local_std", "abs_highpass", "std_highpass")
SHAPE = ("log_area_um2", "perimeter_um", "circularity", "solidity", "eccentricity", "major_um", "minor_um", "touches_edge", "crowding")
NAMES = tuple(f"{r}_{s}" for r in REGIONS for s in STATS) + SHAPE
RINGS_UM = (1.5, 4.0, 8.0)
CORE_UM = 1.0


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _disk(r: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def filtered(image: np.ndarray, background: np.ndarray) -> dict[str, np.ndarray]:
    """The background-referenced image and its filter responses, each the frame's shape (float32)."""
    import cv2

    x = np.asarray(image, dtype=np.float32)
    bg = x[background] if background.any() else x.ravel()
    med = float(np.median(bg))
    mad = float(np.median(np.abs(bg - med)))
    g = (x - med) / (mad if mad > 1e-6 else max(float(bg.std()), 1e-6))
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    mu = cv2.blur(g, (5, 5))
    return {
        "g": g,
        "gradient": np.sqrt(gx * gx + gy * gy),
        "log1": cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), 1.0), cv2.CV_32F),
        "log2.5": cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), 2.5), cv2.CV_32F),
        "local_std": np.sqrt(np.maximum(cv2.blur(g * g, (5, 5)) - mu * mu, 0)),
        "highpass": g - cv2.GaussianBlur(g, (0, 0), 4.0),
    }


def _region_stats(f: dict[str, np.ndarray], m: np.ndarray) -> list[float]:
    v, hp, l2 = f["g"][m], f["highpass"][m], f["log2.5"][m]
    p5, p95 = np.percentile(v, (5, 95))
    return [float(v.mean()), float(v.std()), float(p5), float(p95), float(f["gradient"][m].mean()), float(np.abs(f["log1"][m]).mean()),
            float(l2.mean()), float(np.abs(l2).mean()), float(f["local_std"][m].mean()), float(np.abs(hp).mean()), float(hp.std())]


def measure(image: np.ndarray, labels: np.ndarray, ids: list[int], pixel_size_um: float) -> np.ndarray:
    """(len(ids), 75) float32: the measurements (:data:`NAMES`) of each labelled cell of a frame."""
    import cv2
    from scipy import ndimage as ndi
    from skimage.measure import regionprops

    out = np.zeros((len(ids), len(NAMES)), np.float32)
    if not ids:
        return out
    labels = np.asarray(labels)
    f = filtered(image, labels == 0)
    px = float(pixel_size_um)
    r1, r2, r3 = (max(1, round(r / px)) for r in RINGS_UM)
    k1, k2, k3, kc = _disk(r1), _disk(r2), _disk(r3), _disk(max(1, round(CORE_UM / px)))
    h, w = labels.shape
    boxes = ndi.find_objects(labels, max_label=max(ids))
    for row, i in enumerate(ids):
        box = boxes[i - 1] if i - 1 < len(boxes) else None
        if box is None:
            continue  # a cell without pixels at this scale: zeros
        y0, y1 = max(0, box[0].start - r3 - 1), min(h, box[0].stop + r3 + 1)
        x0, x1 = max(0, box[1].start - r3 - 1), min(w, box[1].stop + r3 + 1)
        lw = labels[y0:y1, x0:x1]
        nuc = lw == i
        other = (lw > 0) & ~nuc
        n8 = nuc.astype(np.uint8)
        d1, d2, d3 = (cv2.dilate(n8, k).astype(bool) for k in (k1, k2, k3))
        core = cv2.erode(n8, kc).astype(bool)
        ring1, ring2, ring3 = d1 & ~nuc, d2 & ~d1, d3 & ~d2 & ~other
        edge = nuc & ~core
        win = {k: v[y0:y1, x0:x1] for k, v in f.items()}
        feats: list[float] = []
        for m, fallback in ((nuc, nuc), (core, nuc), (edge, nuc), (ring1, d1), (ring2, d2), (ring3, d3)):
            feats += _region_stats(win, m if m.sum() > 5 else fallback)
        rp = regionprops(n8)[0]
        area = float(rp.area) * px * px
        perim = float(rp.perimeter) * px
        touches = box[0].start <= r1 or box[1].start <= r1 or box[0].stop >= h - r1 or box[1].stop >= w - r1
        feats += [float(np.log(max(area, 1e-6))), perim, 4 * np.pi * area / max(perim, 1e-3) ** 2, float(rp.solidity),
                  float(rp.eccentricity), float(rp.axis_major_length) * px, float(rp.axis_minor_length) * px, float(touches),
                  float(other[d2].mean())]
        out[row] = feats
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


class MorphologyEncoder(EncoderBase):
    """The frame encoder: :func:`measure` on the frame's label-free channel under the segmentation."""

    name = "morphology"
    dim = len(NAMES)
    id = f"morphology-v{VERSION}:{dim}"
    version = str(VERSION)
    runtime = "numpy/OpenCV"
    frame_only = True

    def encode_cells(self, frame: Any, cells: Any) -> np.ndarray:
        image = frame.image
        if image.ndim == 3:
            image = image.mean(axis=2)
        return measure(image, cells.labels, [c.id for c in cells.cells], frame.pixel_size_um)

    def encode(self, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops)
        n, h, w = crops.shape[:3]
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        yy, xx = np.ogrid[:h, :w]
        disc = (((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) <= (min(h, w) / 8) ** 2).astype(np.int32)
        grey = crops.astype(np.float32).mean(axis=3) if crops.ndim == 4 else crops.astype(np.float32)
        # a crop has no pixel size of its own: 1 um/px keeps the rings inside it
        return np.concatenate([measure(grey[k], disc, [1], 1.0) for k in range(n)])


def _build(options: Options, ctx: BuildContext) -> MorphologyEncoder:
    return MorphologyEncoder()


MORPHOLOGY = plugin_spec(
    "morphology", "75 measurements of each cell's mask and its label-free grey levels (background-referenced) in and around it; "
                  "needs the segmentation (a frame encoder), no weights",
    Options, _build,
)
