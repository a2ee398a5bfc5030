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
