"""``cellmonitor segment``: labels on the input grid, the count printed, one-line errors; real-data F1 floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from monitor.cli.main import main

DISCS_PX = [(30, 40, 12), (35, 110, 14), (95, 50, 13), (100, 125, 15)]  # (y, x, r) on a 140 x 170 image


def _discs(path: Path) -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:140, 0:170]
    truth = np.zeros((140, 170), np.int32)
    img = 1000 + rng.normal(0, 30, truth.shape)
    for i, (cy, cx, r) in enumerate(DISCS_PX, start=1):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        truth[d2 <= r * r] = i
        img += np.where(d2 <= r * r, 1500 * (1 - 0.5 * d2 / (r * r)), 0)
    tifffile.imwrite(path, img.astype(np.uint16))  # no resolution tags: no pixel size
    return truth


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "seg.toml"
    cfg.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n'
        "[pipeline]\npixel_size_um = 0.322\n"
        '[segmenter]\nname = "classical"\n[segmenter.options]\nmode = "intensity"\nmin_area_um2 = 30.0\n'
    )
    return cfg


def test_segment_writes_labels_on_the_input_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "discs.tif"
    truth = _discs(img)
    out = tmp_path / "labels.tif"
    # 0.5 um/px input, pipeline at 0.322 um/px: the segmenter sees a 1.55x larger image
    rc = main(["segment", str(img), "--out", str(out), "--pixel-size", "0.5", "--config", str(_config(tmp_path))])
    assert rc == 0
    printed = capsys.readouterr().out.strip()
    lab = tifffile.imread(out)
    assert lab.shape == truth.shape and lab.dtype == np.uint16
    n = int(printed.split()[0])
    assert n == len(DISCS_PX) == lab.max() == len(np.unique(lab)) - 1
    for i in range(1, len(DISCS_PX) + 1):
        t = truth == i
        ids, cnt = np.unique(lab[t], return_counts=True)
        p = lab == ids[np.argmax(cnt)]
        assert (t & p).sum() / (t | p).sum() > 0.8


def test_segment_default_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    img = tmp_path / "discs.tif"
    _discs(img)
    rc = main(["segment", str(img), "--out", str(tmp_path / "l.tif"), "--pixel-size", "0.322"])
    assert rc == 0
    assert tifffile.imread(tmp_path / "l.tif").shape == (140, 170)
    assert capsys.readouterr().out.split()[1] == "cells"


@pytest.mark.parametrize(
    "case",
    ["missing", "no_pixel_size", "not_an_image", "no_out_dir"],
)
def test_segment_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    img = tmp_path / "discs.tif"
    _discs(img)
    out = tmp_path / "l.tif"
    args = {
        "missing": [str(tmp_path / "nope.tif"), "--pixel-size", "0.5"],
        "no_pixel_size": [str(img)],
        "not_an_image": [str(tmp_path / "junk.tif"), "--pixel-size", "0.5"],
        "no_out_dir": [str(img), "--pixel-size", "0.5"],
    }[case]
    (tmp_path / "junk.tif").write_bytes(b"II*\x00 not really a tiff")
    if case == "no_out_dir":
        out = tmp_path / "missing_dir" / "l.tif"
    rc = main(["segment", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == (66 if case == "missing" else 65)  # a missing file is 66 (EX_NOINPUT) in every command
    assert len(err.splitlines()) == 1 and err.startswith("cellmonitor: error:")
    assert not out.exists()


def test_label_dtype_switches_to_uint32() -> None:
    from monitor.cli.segment import label_dtype, labels_on_input_grid

    assert label_dtype(65535) is np.uint16 and label_dtype(65536) is np.uint32
    many = np.arange(300 * 300, dtype=np.int64).reshape(300, 300)  # 89,999 cells + background
    lab, n = labels_on_input_grid(many, (300, 300))
    assert n == 300 * 300 - 1 and lab.dtype == np.uint32 and lab.max() == n
    # ids that vanish on downsampling are closed up: 1..N stays contiguous
    small, k = labels_on_input_grid(many, (10, 10))
    assert k == 100 - (0 if small.min() else 1) and set(np.unique(small)) == set(range(small.min(), k + 1))


@pytest.mark.realdata
def test_segment_real_t98g_f1_floor(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three held-out t98g frames through the CLI (0.65 um/px -> 0.322 -> back), scored against their masks."""
    import imageio.v3 as iio

    root = shared_data / "timelapse" / "t98g_phase"
    if not root.is_dir():
        pytest.skip("t98g_phase not in the shared data")
    frames = sorted((root / "frames").glob("*.tif"))
    masks = sorted((root / "masks").glob("id_masks_*.png"))
    tp = n = 0
    for i in (4, 20, 35):  # held out from tuning (t01, t10, t19, t28)
        out = tmp_path / f"l{i}.tif"
        assert main(["segment", str(frames[i]), "--out", str(out), "--pixel-size", "0.65"]) == 0
        lab = tifffile.imread(out)
        gt = iio.imread(masks[i])
        assert lab.shape == gt.shape
        tp_i, n_gt, n_pred = _matches(gt, lab)
        tp += tp_i
        n += n_gt + n_pred
    f1 = 2 * tp / n
    print(f"t98g F1 over 3 held-out frames through the CLI: {f1:.3f}")
    assert f1 > F1_FLOOR, f"F1 {f1:.3f}"


def _matches(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """(pairs with IoU > 0.5, n true cells, n predicted cells); above 0.5 a match is unique."""
    _, g = np.unique(gt, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    g, p = g.ravel().astype(np.int64), p.ravel().astype(np.int64)
    ng, npr = int(g.max()) + 1, int(p.max()) + 1
    c = np.bincount(g * npr + p, minlength=ng * npr).reshape(ng, npr)
    inter = c[1:, 1:]
    union = c.sum(1)[1:, None] + c.sum(0)[None, 1:] - inter
    return int((inter > 0.5 * union).sum()), ng - 1, npr - 1


F1_FLOOR = 0.55
