"""The morphology encoder: what each measurement means, what it must not depend on, the cells' order."""

from __future__ import annotations

import numpy as np
import pytest
from cellmonitor_plugins.encoders.morphology import NAMES, MorphologyEncoder, measure

from monitor.records import Cell, Cells, Frame, FrameKey


def _field(size: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background, a dark round nucleus (id 4) with a bright rim, a bright elongated one (id 9)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = rng.normal(1000.0, 10.0, (size, size))
    labels = np.zeros((size, size), np.int32)
    r = np.hypot(yy - 50, xx - 50)
    labels[r < 15] = 4
    img[r < 15] -= 200.0
    img[(r >= 15) & (r < 19)] += 300.0  # a bright halo just outside the first nucleus
    ell = ((yy - 110) / 8.0) ** 2 + ((xx - 100) / 24.0) ** 2 < 1
    labels[ell] = 9
    img[ell] += 150.0
    return img.astype(np.float32), labels


def col(name: str) -> int:
    return NAMES.index(name)


def test_each_measurement_says_what_its_name_says() -> None:
    img, labels = _field()
    f = measure(img, labels, [4, 9], 0.5)
    assert f.shape == (2, 75) and np.isfinite(f).all()
    # grey levels in background MADs (noise sd 10 -> MAD ~6.7): the dark nucleus ~ -30, the bright one ~ +22
    assert f[0, col("mask_mean")] == pytest.approx(-200 / 6.745, rel=0.1)
    assert f[1, col("mask_mean")] == pytest.approx(150 / 6.745, rel=0.1)
    # the halo is in the first ring of nucleus 4 (0-1.5 um = 0-3 px) and brighter than its far ring
    assert f[0, col("ring0-1.5um_mean")] > 20 and abs(f[0, col("ring4-8um_mean")]) < 3
    # shape: a disc of radius 15 px = 7.5 um, circular; an ellipse 2 x 24 by 2 x 8 px, eccentric
    assert np.exp(f[0, col("log_area_um2")]) == pytest.approx(np.pi * 7.5**2, rel=0.05)
    assert f[0, col("circularity")] > 0.85 and f[0, col("eccentricity")] < 0.2
    assert f[1, col("eccentricity")] > 0.9 and f[1, col("major_um")] == pytest.approx(24.0, rel=0.1)
    assert f[0, col("touches_edge")] == 0.0 and f[0, col("crowding")] == 0.0


def test_measurements_do_not_depend_on_exposure_or_lamp() -> None:
    """Grey levels are referenced to the field's background: a gain and an offset change nothing."""
    img, labels = _field()
    a = measure(img, labels, [4, 9], 0.5)
    b = measure(3.0 * img + 500.0, labels, [4, 9], 0.5)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_far_ring_leaves_other_cells_out_and_crowding_sees_them() -> None:
    img, labels = _field()
    yy, xx = np.mgrid[0:160, 0:160]
    a = measure(img, labels, [4], 0.5)[0]
    far = np.hypot(yy - 50, xx - 77) < 3  # a neighbour 9-15 px (4.5-7.5 um) outside nucleus 4's rim: in its 4-8 um ring
    labels2, img2 = labels.copy(), img.copy()
    labels2[far] = 7
    img2[far] += 5000.0  # very bright: were it counted in the ring, the ring's mean would jump
    b = measure(img2, labels2, [4], 0.5)[0]
    assert b[col("ring4-8um_mean")] == pytest.approx(a[col("ring4-8um_mean")], abs=1.0)
    assert b[col("crowding")] == 0.0  # beyond 4 um: not crowding
    near = np.hypot(yy - 50, xx - 70) < 4  # 1-9 px (0.5-4.5 um) outside the rim
    labels3 = labels.copy()
    labels3[near] = 7
    c = measure(img, labels3, [4], 0.5)[0]
    assert c[col("crowding")] > 0.01 and a[col("crowding")] == 0.0


def test_encoder_follows_the_cells_order_and_its_pixel_size() -> None:
    img, labels = _field()
    key = FrameKey("e", "A1", "1", 1)
    frame = Frame(key, {"bf": img}, "bf", None, 0.5, "config", "test")
    cells = [Cell(9, (110.0, 100.0), 0.0, (0, 0, 1, 1)), Cell(4, (50.0, 50.0), 0.0, (0, 0, 1, 1))]
    enc = MorphologyEncoder()
    v = enc.encode_cells(frame, Cells(labels, tuple(cells), 0.5))
    np.testing.assert_array_equal(v, measure(img, labels, [9, 4], 0.5))
    coarse = Frame(key, {"bf": img}, "bf", None, 1.0, "config", "test")
    assert enc.encode_cells(coarse, Cells(labels, tuple(cells), 1.0))[1, col("log_area_um2")] == pytest.approx(
        v[1, col("log_area_um2")] + np.log(4.0), abs=1e-4)
    # crops without a frame (the service's warm-up) still give finite vectors of the right size
    crops = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    out = enc.encode(crops)
    assert out.shape == (2, enc.dim) and np.isfinite(out).all()


def test_the_encoder_passes_the_plugin_contract_checks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from monitor.config import PluginRef
    from monitor.protocols import BuildContext
    from monitor.registry import Registry
    from monitor.testing import check_encoder

    enc = Registry([]).build("encoders", PluginRef(name="morphology"), BuildContext(state_dir=tmp_path))
    v = check_encoder(enc, n=2, size=48)
    assert v.shape == (2, 75) and enc.frame_only
