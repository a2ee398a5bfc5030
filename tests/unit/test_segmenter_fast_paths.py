"""The classical segmenter's fast paths (plugins/segmenters/morph.py) give the library's answers exactly.

Each stand-in is compared with the scikit-image / scipy / numpy call it
replaces on random images (plateaus, ties and frame edges included); then the
whole segmenter, with every stand-in swapped back for its library call, must
give the same labels on synthetic frames in each mode.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from cellmonitor_plugins.segmenters import blobs, morph
from cellmonitor_plugins.segmenters.classical import Options, segment_image
from scipy import ndimage as ndi

SHAPES = [(1, 7), (9, 1), (17, 23), (64, 48), (90, 130)]


def _smooth(rng: np.random.Generator, shape: tuple[int, int], plateaus: bool) -> np.ndarray:
    img = cv2.GaussianBlur(rng.random(shape).astype(np.float32) * 10, (0, 0), float(rng.uniform(0.7, 4)))
    return (np.round(img * 2) / 2).astype(np.float32) if plateaus else img


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("plateaus", [False, True])
def test_h_maxima_is_scikit_images(shape: tuple[int, int], plateaus: bool) -> None:
    from skimage.morphology import h_maxima

    rng = np.random.default_rng(sum(shape) + plateaus)
    for h in (0.05, 0.5, 2.0):
        img = _smooth(rng, shape, plateaus)
        np.testing.assert_array_equal(morph.h_maxima(img, h), h_maxima(img, h))


@pytest.mark.parametrize("shape", SHAPES)
def test_fill_holes_is_scipys(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    for p in (0.3, 0.6, 0.8):
        m = rng.random(shape) < p
        np.testing.assert_array_equal(morph.fill_holes(m), ndi.binary_fill_holes(m))


@pytest.mark.parametrize("radius", [1.0, 2.5, 5.0, 9.8])
def test_within_distance_is_the_distance_transform(radius: float) -> None:
    rng = np.random.default_rng(2)
    pts = rng.random((70, 90)) < 0.01
    pts[0, 0] = pts[-1, 5] = True  # discs cut by the frame edge
    np.testing.assert_array_equal(morph.within_distance(np.argwhere(pts), pts.shape, radius), ndi.distance_transform_edt(~pts) <= radius)


@pytest.mark.parametrize("shape", SHAPES[2:])
@pytest.mark.parametrize("plateaus", [False, True])
def test_peak_local_max_is_scikit_images(shape: tuple[int, int], plateaus: bool) -> None:
    from skimage.feature import peak_local_max

    rng = np.random.default_rng(3)
    for min_distance in (1, 3, 7):
        img = _smooth(rng, shape, plateaus)
        thr = float(np.quantile(img, 0.4))
        want = peak_local_max(img, min_distance=min_distance, threshold_abs=thr, exclude_border=False)
        np.testing.assert_array_equal(morph.peak_local_max(img, min_distance, thr), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("plateaus", [False, True])
def test_watershed_is_scikit_images(shape: tuple[int, int], plateaus: bool) -> None:
    from skimage.segmentation import watershed

    rng = np.random.default_rng(6)
    for i in range(4):
        img = _smooth(rng, shape, plateaus) * (-1 if i % 2 else 1)
        mask = rng.random(shape) < (0.85 if i < 2 else 1.0)
        markers, _ = ndi.label(rng.random(shape) < 0.03)
        markers[rng.random(shape) < 0.01] = 2  # a label in several places, some outside the mask
        want = watershed(img, markers, mask=mask)
        got = morph.watershed(img, markers, mask)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_region_shape_measures_are_scikit_images() -> None:
    from skimage.measure import regionprops
    from skimage.morphology import convex_hull_image

    rng = np.random.default_rng(4)
    lab, n = ndi.label(cv2.GaussianBlur(rng.random((160, 160)).astype(np.float32), (0, 0), 2.5) > 0.5)
    assert n > 20
    for rp in regionprops(lab):
        assert morph.convex_area(rp.image) == int(np.sum(convex_hull_image(rp.image)))
        ratio = rp.axis_major_length / max(rp.axis_minor_length, 1.0)
        assert morph.axis_ratio(*np.nonzero(rp.image)) == pytest.approx(ratio, rel=1e-12)


def test_order_statistics_are_numpys() -> None:
    rng = np.random.default_rng(5)
    for i in range(400):
        x = (rng.standard_normal(int(rng.integers(1, 700))) * 3).astype(np.float32)
        if i % 2:
            x = np.round(x)  # ties
        s = np.sort(x)
        assert morph.median_sorted(s) == np.median(x)
        for q in (0.5, 10, 50, 90):
            got, want = morph.percentile_sorted(s, q), np.percentile(x, q)
            assert got == want and type(got) is type(want)
    for i in range(6):
        x = rng.standard_normal(70_000 + i).astype(np.float32)
        if i % 2:
            x = np.round(x * 3)
        assert morph.median(x) == np.median(x)


def _direct_remove_lines(signal: np.ndarray, length_px: int, n_angles: int) -> np.ndarray:
    """The straightforward line removal: each whole line kernel, OpenCV's mirrored edge."""
    lines = np.zeros_like(signal)
    for k in blobs.line_kernels(length_px, n_angles):
        opened = cv2.dilate(cv2.erode(signal, k, borderType=cv2.BORDER_REFLECT), k, borderType=cv2.BORDER_REFLECT)
        np.maximum(lines, opened, out=lines)
    return signal - lines


@pytest.mark.parametrize(("length_px", "n_angles"), [(57, 12), (20, 12), (9, 7), (31, 5)])
@pytest.mark.parametrize("shape", [(120, 150), (15, 70), (70, 15)])
def test_factored_line_openings_are_the_whole_lines(length_px: int, n_angles: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(length_px)
    signal = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 1.5)
    signal[shape[0] // 2, :] += 2.0  # a ruling line
    np.testing.assert_array_equal(blobs.remove_lines(signal, length_px, n_angles), _direct_remove_lines(signal, length_px, n_angles))
    factored = sum(int(k.sum()) for f in blobs.line_plans(length_px, n_angles) for k, _ in f)
    whole = sum(int(k.sum()) for k in blobs.line_kernels(length_px, n_angles))
    assert factored <= whole and (length_px < 30 or factored < 0.5 * whole)


def library_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap every fast path of the segmenter back for the library call it stands in for."""
    from skimage.feature import peak_local_max
    from skimage.morphology import convex_hull_image, h_maxima
    from skimage.segmentation import watershed

    monkeypatch.setattr(morph, "watershed", lambda img, markers, mask: watershed(img, markers, mask=mask))
    monkeypatch.setattr(morph, "h_maxima", h_maxima)
    monkeypatch.setattr(morph, "fill_holes", ndi.binary_fill_holes)
    monkeypatch.setattr(morph, "within_distance", lambda pts, shape, r: ndi.distance_transform_edt(_points(pts, shape) == 0) <= r)
    monkeypatch.setattr(morph, "peak_local_max", lambda img, d, thr: peak_local_max(img, min_distance=d, threshold_abs=thr, exclude_border=False))
    monkeypatch.setattr(morph, "convex_area", lambda m: int(np.sum(convex_hull_image(m))))
    monkeypatch.setattr(morph, "median", np.median)
    monkeypatch.setattr(morph, "median_sorted", np.median)
    monkeypatch.setattr(morph, "percentile_sorted", np.percentile)
    monkeypatch.setattr(blobs, "remove_lines", _direct_remove_lines)


def _points(pts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[tuple(np.asarray(pts).T)] = 1
    return out


def _phase_field(seed: int) -> np.ndarray:
    """Textured, haloed cells of several sizes (some touching, some cut by the edge) on a graded background."""
    rng = np.random.default_rng(seed)
    h, w = 260, 300
    yy, xx = np.mgrid[:h, :w]
    img = 30000 + 20 * xx + rng.normal(0, 150, (h, w))
    for _ in range(14):
        cy, cx, r = rng.uniform(-10, h + 10), rng.uniform(-10, w + 10), rng.uniform(12, 30)
        d = np.hypot(yy - cy, xx - cx)
        img += np.where(d < r, 2500 * rng.normal(0, 1, (h, w)), 0) + np.where(np.abs(d - r) < 2, 4000, 0)
    return np.clip(img, 0, 65535).astype(np.uint16)


def _chamber_field(seed: int) -> np.ndarray:
    """Living and dead cells, some touching the edge, and a ruling line, on a brightfield background."""
    rng = np.random.default_rng(seed)
    h, w = 240, 260
    yy, xx = np.mgrid[:h, :w]
    img = (0.5 + rng.normal(0, 0.01, (h, w))).astype(np.float32)
    for i in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 12)
        d = np.hypot(yy - cy, xx - cx)
        if i % 3:
            img[(d <= r) & (d > 0.65 * r)] -= 0.45
            img[d <= 0.45 * r] += 0.3
        else:
            img[d <= r] -= 0.2
            img[d <= 0.5 * r] -= 0.25
    img[150:153] -= 0.4
    img[153:155] += 0.3
    return img


def _qpi_field(seed: int) -> np.ndarray:
    """Smooth bright domes of several sizes (some touching, some cut by the edge) on a noisy dark background."""
    rng = np.random.default_rng(seed)
    h, w = 260, 300
    yy, xx = np.mgrid[:h, :w]
    img = 1000 + rng.normal(0, 40, (h, w))
    for _ in range(14):
        cy, cx, r = rng.uniform(-10, h + 10), rng.uniform(-10, w + 10), rng.uniform(12, 30)
        img += 2000 * np.clip(1 - np.hypot(yy - cy, xx - cx) / r, 0, None) ** 0.5
    return np.clip(img, 0, 65535).astype(np.uint16)


CASES = [
    ("contrast", _phase_field, 0.65, {}),
    ("contrast, finer grid", _phase_field, 0.8, {"work_pixel_size_um": 0.8, "merge_snr": 2.0}),
    ("intensity", _qpi_field, 0.65, {"mode": "intensity"}),
    ("blobs", _chamber_field, 0.7, {"mode": "blobs", "work_pixel_size_um": 0.7, "background_um": 14.0, "contrast_um": 1.5}),
    ("blobs, loose rule", _chamber_field, 0.7, {"mode": "blobs", "work_pixel_size_um": 0.7, "background_um": 14.0, "contrast_um": 1.5,
                                               "blob_snr": 10.0, "min_dark": 0.0, "min_solidity": 0.0, "line_um": 20.0}),
]


@pytest.mark.parametrize(("name", "make", "um", "options"), CASES, ids=[c[0] for c in CASES])
def test_the_segmenter_gives_the_library_calls_labels(name: str, make, um: float, options: dict) -> None:
    o = Options(**options)
    images = [make(seed) for seed in (0, 1)]
    fast = [segment_image(image, um, o) for image in images]
    assert all(lab.max() > 2 for lab in fast), name  # cells were found: the comparison means something
    with pytest.MonkeyPatch.context() as mp:
        library_calls(mp)
        reference = [segment_image(image, um, o) for image in images]
    for got, want in zip(fast, reference, strict=True):
        np.testing.assert_array_equal(got, want)


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """numba refuses cache=True at import when no cache folder is writable (a read-only package under
    systemd's ProtectSystem): the kernels then compile without the disk cache instead of failing."""
    import numba as nb
    from cellmonitor_plugins.segmenters import _jit

    real = nb.njit

    def njit(*args, **kw):
        if kw.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **kw)

    monkeypatch.setattr(_jit.nb, "njit", njit)

    def add_one(x):
        return x + 1

    assert _jit._njit(add_one)(1) == 2


def test_the_compiled_kernels_release_the_gil():
    """The segment-ahead thread runs them beside the encoders and classify: none may hold the GIL."""
    import numba as nb
    from cellmonitor_plugins.segmenters import _jit

    kernels = {n: f for n, f in vars(_jit).items() if isinstance(f, nb.core.registry.CPUDispatcher)}
    assert {"watershed_4", "reconstruct_dilation", "greedy_spacing"} <= set(kernels)
    assert all(f.targetoptions.get("nogil") for f in kernels.values()), {n: f.targetoptions for n, f in kernels.items()}
