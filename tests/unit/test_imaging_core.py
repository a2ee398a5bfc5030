"""Rescale and the Otsu control signal: the shared core steps."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.control import otsu_control
from monitor.imaging import rescale, rescale_factor
from monitor.records import Frame, FrameKey


def frame(img: np.ndarray, px: float) -> Frame:
    return Frame(FrameKey("e", "A1", "1", 0), {"ri": img}, "ri", None, px, "config", "nanolive")


def test_nanolive_to_lionheart_factor_is_059():
    assert rescale_factor(0.19, 0.322) == pytest.approx(0.590, abs=1e-3)


def test_rescale_shape_and_pixel_size():
    f = rescale(frame(np.zeros((448, 448), np.float32), 0.19), 0.322)
    assert f.image.shape == (264, 264)  # 448 * 0.59 = 264.3
    assert f.pixel_size_um == 0.322
    # the field of view in um is preserved
    assert f.image.shape[0] * 0.322 == pytest.approx(448 * 0.19, rel=0.01)


def test_rescale_preserves_mean_intensity_when_shrinking():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (400, 400)).astype(np.float32)
    f = rescale(frame(img, 0.19), 0.322)
    assert float(f.image.mean()) == pytest.approx(float(img.mean()), abs=0.01)


def test_rescale_noop_at_target():
    img = np.ones((10, 10), np.float32)
    assert rescale(frame(img, 0.322), 0.322).image is img


def test_otsu_area_of_known_bright_square():
    rng = np.random.default_rng(1)
    img = rng.normal(100, 2, (200, 200)).astype(np.float32)
    img[50:80, 60:100] = 1000  # 30 x 40 = 1200 px
    c = otsu_control(img, 0.5, "apo15")
    assert c.area_um2 == pytest.approx(1200 * 0.25)
    assert c.area_fraction == pytest.approx(1200 / 40000)
    assert c.n_regions == 1


def test_noise_only_frame_has_no_signal_but_plain_otsu_would():
    img = np.random.default_rng(2).normal(100, 2, (200, 200)).astype(np.float32)
    assert otsu_control(img, 0.5, "pi").area_fraction == 0.0
    assert otsu_control(img, 0.5, "pi", min_snr=0).area_fraction > 0.3  # the paper's plain Otsu


def test_small_regions_dropped():
    img = np.zeros((50, 50), np.float32)
    img[10:20, 10:20] = 1
    img[40, 40] = 1  # single pixel
    c = otsu_control(img, 1.0, "pi", min_region_px=4)
    assert c.area_um2 == 100 and c.n_regions == 1


def _display_range_per_pixel(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """The crop view as it was computed pixel by pixel (percentiles of every pixel, every pixel mapped)."""
    from monitor.imaging import to_float

    g = to_float(image)
    lo, hi = np.percentile(g, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1.0
    return np.repeat((np.clip((g - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_crop_view_of_an_integer_frame_is_the_per_pixel_one_to_the_byte(dtype: type) -> None:
    """display_range's histogram path (uint8 / uint16 frames) and the median fill give the bytes and the
    number of the per-pixel computation: flat, two-level, sparse and skewed fields of any size."""
    from monitor.imaging import display_range, grey_median

    rng = np.random.default_rng(5)
    top = 65536 if dtype == np.uint16 else 256
    for i in range(120):
        shape = (int(rng.integers(1, 70)), int(rng.integers(1, 70)))
        levels = [1, 2, 3, 17, top][i % 5]
        img = rng.integers(0, levels, shape) if i % 3 else np.clip(rng.normal(top / 3, top / 20, shape), 0, top - 1)
        img = np.asarray(img).astype(dtype)
        got = display_range(img)
        assert got.dtype == np.uint8 and np.array_equal(got, _display_range_per_pixel(img)), (i, shape, levels)
        assert grey_median(got[..., 0]) == np.median(got[..., 0])
    big = rng.integers(0, top, (904, 1224)).astype(dtype)
    assert np.array_equal(display_range(big), _display_range_per_pixel(big))


def test_histogram_percentiles_are_numpys_to_the_bit() -> None:
    """Any percentiles of any histogram: numpy's float64 numbers of the repeated levels, ends included."""
    from monitor.imaging import histogram_percentiles

    rng = np.random.default_rng(11)
    for i in range(400):
        counts = np.bincount(rng.integers(0, [1, 2, 5, 256, 70000][i % 5], int(rng.integers(1, 2000))), minlength=256)
        levels = np.arange(counts.size, dtype=np.float32)
        q = [[0.0, 100.0], [0.5, 99.5], [50.0, 25.0]][i % 3] + [float(rng.uniform(0, 100))]
        want = np.percentile(np.repeat(levels, counts), q)
        got = histogram_percentiles(levels, counts, q)
        assert got.dtype == want.dtype and np.array_equal(got, want), (i, q, got, want)
