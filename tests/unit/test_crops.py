"""Crops: centring on the mask centroid, padding at the border, background blanking."""

from __future__ import annotations

import numpy as np

from monitor.imaging import crop_at, crop_cells, resize
from monitor.records import Frame, FrameKey
from monitor.segmentation import cells_from_labels


def _frame(img: np.ndarray, um: float = 0.5) -> Frame:
    return Frame(FrameKey("e", "A1", "1", 0), {"bf": img}, "bf", None, um, "config", "test")


def test_crop_is_centred_on_the_centroid() -> None:
    rgb = np.zeros((100, 120, 3), np.uint8)
    rgb[40, 70] = (255, 0, 0)
    crops = crop_at(rgb, np.array([[40.0, 70.0], [40.4, 69.6]]), 32, pad_value=0)
    assert crops.shape == (2, 32, 32, 3) and crops.dtype == np.uint8
    for c in crops:
        ys, xs = np.nonzero(c[..., 0])
        assert (ys.tolist(), xs.tolist()) == ([16], [16])


def test_crop_pads_at_the_border_with_the_median() -> None:
    rgb = np.full((50, 60, 3), 90, np.uint8)
    rgb[:5, :5] = 200  # the image corner
    crops = crop_at(rgb, np.array([[0.0, 0.0], [49.0, 59.0], [-500.0, 10.0]]), 20)
    # top-left: the image occupies the bottom-right quadrant from index 10
    c = crops[0]
    assert (c[:10] == 90).all() and (c[:, :10] == 90).all()
    assert (c[10:15, 10:15] == 200).all() and (c[15:, 15:] == 90).all()
    # bottom-right: image in the top-left 11x11, padding after
    assert crops[1].shape == (20, 20, 3) and (crops[1][11:] == 90).all()
    # a centre far outside: all padding
    assert (crops[2] == 90).all()


def test_crop_cells_centroid_size_and_blanking() -> None:
    h, w = 80, 90
    img = np.full((h, w), 1000, np.uint16)
    img[10:30, 10:30] = 3000  # cell 1
    img[12:28, 30:46] = 5000  # cell 2, touching cell 1
    img[70:80, 80:90] = 4000  # cell 3, in the corner
    lab = np.zeros((h, w), np.int32)
    lab[10:30, 10:30] = 1
    lab[12:28, 30:46] = 2
    lab[70:80, 80:90] = 3
    cells = cells_from_labels(lab, 0.5)
    frame = _frame(img)
    plain = crop_cells(frame, cells, 48)
    blank = crop_cells(frame, cells, 48, blank_background=True)
    assert plain.shape == blank.shape == (3, 48, 48, 3)
    fill = int(blank[0, 0, 0, 0])
    # cell 1 centred: its centroid (19.5, 19.5) rounds to (20, 20) -> crop index 24
    assert plain[0, 24, 24, 0] == blank[0, 24, 24, 0] > fill
    # the neighbour (cell 2) is visible without blanking and blanked with it
    assert plain[0, 24, 24 + 14, 0] > plain[0, 24, 24, 0]
    assert (blank[0][:, 24 + 11 :] == fill).all()
    # blanking keeps exactly the cell's own pixels
    kept = (blank[0, ..., 0] != fill).sum()
    assert kept == 400
    # corner cell: padding beyond the image edge equals the blank fill (image median)
    # its centroid (74.5, 84.5) rounds half-to-even to (74, 84): rows/cols from 24 + 6 lie outside
    assert (plain[2][24 + 6 :, :] == fill).all() and (plain[2][:, 24 + 6 :] == fill).all()
    assert (plain[2][24 + 5, 24 + 5] != fill).all()
    assert (blank[2, ..., 0] != fill).sum() == 100


def test_crop_size_is_configurable_and_no_cells_is_empty() -> None:
    img = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    empty = cells_from_labels(np.zeros((40, 40), np.int32), 1.0)
    assert crop_cells(_frame(img), empty, 224).shape == (0, 224, 224, 3)
    lab = np.zeros((40, 40), np.int32)
    lab[5:9, 5:9] = 1
    assert crop_cells(_frame(img), cells_from_labels(lab, 1.0), 17).shape == (1, 17, 17, 3)


def test_label_resize_is_nearest_and_keeps_dtype() -> None:
    lab = np.array([[0, 70000], [3, 4]], np.uint32)
    up = resize(lab, (4, 6), labels=True)
    assert up.dtype == np.uint32 and set(np.unique(up)) == {0, 3, 4, 70000}
    assert (up[:2, :3] == 0).all() and (up[:2, 3:] == 70000).all()
    assert (resize(up, (2, 2), labels=True) == lab).all()


def test_background_contrast_keeps_faint_texture_that_a_percentile_stretch_loses():
    """A field with one very bright speck: the percentile view squeezes the faint cell texture into
    a few grey levels; the background view (median +- 15 MADs) keeps it."""
    from monitor.imaging import background_range, display_range, frame_view

    rng = np.random.default_rng(0)
    g = 1000 + rng.normal(0, 10, (200, 200))
    g[50:70, 50:70] += 40  # a faint cell: +4 noise sigmas
    g[150:155, 150:155] = 60000  # bright debris (over 0.5% of the field)
    g[0:20, :] = 60000
    faint = lambda v: float(v[50:70, 50:70, 0].mean()) - float(v[100:120, 100:120, 0].mean())  # noqa: E731
    assert faint(background_range(g)) > 10 * max(faint(display_range(g)), 0.5)
    assert 120 <= background_range(g)[100:120, 100:120, 0].mean() <= 135  # the background sits at mid-grey
    assert np.array_equal(frame_view(g, "percentile"), display_range(g)) and np.array_equal(frame_view(g, "background"), background_range(g))
    rgb = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(background_range(rgb), rgb)  # colour passes through
