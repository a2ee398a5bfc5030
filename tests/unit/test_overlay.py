"""Overlay drawing, crop marks and the confusion-matrix PNG, on hand-made arrays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.report.overlay import (
    STATE_RGB,
    class_colours,
    draw_overlay,
    draw_scale_bar,
    mark_cell,
    nice_length_um,
    outlines,
)

CLASSES = ("live", "apoptotic", "necrotic", "dead")


def _two_cells() -> tuple[np.ndarray, np.ndarray]:
    img = np.full((240, 320), 60, np.uint16)
    img[0, 0] = 0
    img[0, 1] = 1000  # a display range to stretch
    yy, xx = np.mgrid[:240, :320]
    labels = np.zeros((240, 320), np.int32)
    labels[(yy - 80) ** 2 + (xx - 90) ** 2 < 30**2] = 1
    labels[(yy - 120) ** 2 + (xx - 220) ** 2 < 25**2] = 2
    return img, labels


def _has(rgb: np.ndarray, colour: tuple[int, int, int], mask: np.ndarray | None = None) -> int:
    hit = np.all(rgb == np.array(colour, np.uint8), axis=-1)
    return int(hit[mask].sum()) if mask is not None else int(hit.sum())


def test_outlines_take_each_cells_state_colour() -> None:
    img, labels = _two_cells()
    out = draw_overlay(img, labels, [0, 3], CLASSES, 0.5, legend=False, scale_bar=False, thickness=2)
    assert out.shape == (240, 320, 3) and out.dtype == np.uint8
    edge = outlines(labels, 2)
    on1, on2 = edge & (labels == 1), edge & (labels == 2)
    assert _has(out, STATE_RGB["live"], on1) == on1.sum()  # every outline pixel of cell 1 is live green
    assert _has(out, STATE_RGB["dead"], on2) == on2.sum()
    assert _has(out, STATE_RGB["live"], labels == 2) == 0
    inner = (labels == 1) & ~edge
    assert _has(out, STATE_RGB["live"], inner) == 0  # the cell itself stays visible
    with pytest.raises(ValueError, match="not on one grid"):
        draw_overlay(img, labels[:10], [0, 3], CLASSES, 0.5)


def test_cell_ids_map_states_and_uncertain_cells_get_a_dot() -> None:
    img, labels = _two_cells()
    out = draw_overlay(img, labels, [3, 0], CLASSES, 0.5, cell_ids=[2, 1], uncertain=[True, False], legend=False, scale_bar=False)
    edge = outlines(labels, 2)
    assert _has(out, STATE_RGB["dead"], edge & (labels == 2)) > 0 and _has(out, STATE_RGB["live"], edge & (labels == 1)) > 0
    assert (out[120, 220] == 255).all()  # dot at cell 2's centroid
    assert not (out[80, 90] == 255).all()


def test_scale_bar_length_follows_the_pixel_size() -> None:
    rgb = np.zeros((240, 320, 3), np.uint8)
    um = nice_length_um(320, 0.5)
    assert um == 25.0  # the longest of 1, 2, 5, 10, 20, 25 ... within a fifth of 320 px at 0.5 um/px
    out = draw_scale_bar(rgb, 0.5)
    runs = [int((row == 255).all(axis=1).sum()) for row in out[200:]]
    assert max(runs) == 50  # 25 um / 0.5 um per px
    out2 = draw_scale_bar(rgb, 0.25)
    assert max(int((row == 255).all(axis=1).sum()) for row in out2[200:]) == round(nice_length_um(320, 0.25) / 0.25)


def test_legend_names_each_class_with_its_colour() -> None:
    img, labels = _two_cells()
    out = draw_overlay(img, labels, [0, 3], CLASSES, 0.5, scale_bar=False)
    top_right = np.zeros(labels.shape, bool)
    top_right[:80, 200:] = True
    top_right &= labels == 0
    for s in CLASSES:
        assert _has(out, STATE_RGB[s], top_right) >= 25, s  # a swatch per class


def test_class_colours_many_other_classes_are_distinct() -> None:
    pbc = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    c = class_colours(pbc, {k: "other" for k in pbc})
    assert len(set(c.values())) == 8
    assert class_colours(["Dead Cell"], {"Dead Cell": "dead"})["Dead Cell"] == STATE_RGB["dead"]


def test_mark_cell_box_corners_and_centre_ticks() -> None:
    crop = np.zeros((90, 90, 3), np.uint8)
    m = mark_cell(crop, (30, 20, 60, 70))
    cyan = np.all(m == (0, 230, 255), axis=-1)
    assert cyan[30, 20] and cyan[59, 69] and not cyan[45, 45]  # corners marked, the cell's middle left alone
    t = mark_cell(crop)
    cyan = np.all(t == (0, 230, 255), axis=-1)
    assert cyan.any() and not cyan[40:51, 40:51].any()  # ticks point at the centre without covering it
    assert cyan[45].any() and cyan[:, 45].any()


def _scores(n: int) -> object:
    from monitor.index.evaluate import Scores

    classes = tuple(f"class_{i}_name" for i in range(n))
    conf = np.eye(n, dtype=int) * 9 + 1
    return Scores("EWC", 0.812, 0.845, dict.fromkeys(classes, 0.8), conf, classes, classes, 5.0, int(conf.sum()))


@pytest.mark.parametrize("n", [2, 8])
def test_confusion_png_readable_and_title_whole(tmp_path: Path, n: int) -> None:
    from monitor.report.classification import confusion_png

    img = cv2.imread(str(confusion_png(_scores(n), tmp_path / "c.png")))  # type: ignore[arg-type]
    h, w = img.shape[:2]
    assert w >= 500 and h >= 400, (w, h)
    ink = (img < 200).any(axis=2)
    # nothing touches the edges: the title and labels are inside the picture
    assert not ink[:5].any() and not ink[-5:].any() and not ink[:, :5].any() and not ink[:, -5:].any()
    # the title is the topmost ink and is as wide as its text needs (about 40 characters)
    first = int(np.argmax(ink.any(axis=1)))
    title_rows = ink[first : first + 20]
    cols = np.flatnonzero(title_rows.any(axis=0))
    assert cols[-1] - cols[0] > 250


def test_confusion_png_grows_with_classes(tmp_path: Path) -> None:
    from monitor.report.classification import confusion_png

    small = cv2.imread(str(confusion_png(_scores(2), tmp_path / "a.png")))  # type: ignore[arg-type]
    big = cv2.imread(str(confusion_png(_scores(8), tmp_path / "b.png")))  # type: ignore[arg-type]
    assert big.shape[0] > small.shape[0] and big.shape[1] > small.shape[1]


def test_unknown_cells_are_grey_not_their_called_colour() -> None:
    """A frame of unknown cells must not look sure: grey outlines, whatever the call was."""
    img, labels = _two_cells()
    out = draw_overlay(img, labels, [3, 3], CLASSES, 0.5, unknown=[True, False], legend=False, scale_bar=False, thickness=2)
    edge = outlines(labels, 2)
    assert _has(out, (128, 128, 128), edge & (labels == 1)) == (edge & (labels == 1)).sum()
    assert _has(out, STATE_RGB["dead"], edge & (labels == 1)) == 0
    assert _has(out, STATE_RGB["dead"], edge & (labels == 2)) == (edge & (labels == 2)).sum()  # the known cell keeps its colour
