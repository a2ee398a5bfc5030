"""``cellmonitor report`` and ``cellmonitor overlay`` on the demo's run (real service, reader, segmenter, Lite0, index)."""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from monitor.cli.main import main
from monitor.report.overlay import STATE_RGB

WELLS = ("A1", "B2")
STATES = ("live", "apoptotic", "necrotic", "dead")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from monitor.demo.run import run_demo

    folder = tmp_path_factory.mktemp("report") / "demo"
    run_demo(folder, n_timepoints=3, wells=WELLS, cells_per_field=10, per_state=12, metrics_port=None, say=lambda m: None)
    return folder


@pytest.fixture(scope="module")
def report(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("out")
    assert main(["report", str(demo / "demo.toml"), "--out", str(out), "--frames-per-well", "2", "--per-state", "4"]) == 0
    return out, (out / "demo.html").read_text()


def _downloads(page: str) -> dict[str, pd.DataFrame]:
    out = {}
    for name, b64 in re.findall(r"download='demo_([a-z_]+)\.csv' href='data:text/csv;charset=utf-8;base64,([A-Za-z0-9+/=]+)'", page):
        out[name] = pd.read_csv(io.StringIO(base64.b64decode(b64).decode()), dtype={"well": str})
    return out


def _pngs(page: str) -> list[np.ndarray]:
    imgs = []
    for b64 in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page):
        img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.size > 0
        imgs.append(img)
    return imgs


@pytest.mark.timeout(600)
def test_report_tables_equal_the_csv(demo: Path, report: tuple[Path, str]) -> None:
    _, page = report
    csv = pd.read_csv(demo / "state" / "counts.csv", dtype={"well": str})
    tables = _downloads(page)
    assert {"timecourse", "cells_per_frame", "plate_map", "control_vs_death", "counts", "gallery"} <= set(tables)
    tc = tables["timecourse"]
    assert sorted(tc["well"].unique()) == list(WELLS)  # every well's series
    for w in WELLS:
        assert sorted(tc.loc[tc["well"] == w, "timepoint"]) == [1, 2, 3]
    merged = tc.merge(csv, on=["well", "timepoint"], suffixes=("", "_csv"))
    assert len(merged) == len(csv) == 6
    for s in STATES:
        assert (merged[f"n_{s}"] == merged[f"n_{s}_csv"]).all()
        assert np.allclose(merged[f"frac_{s}"], merged[f"frac_{s}_csv"], atol=1e-4)
    assert (merged["n_cells"] == merged["n_cells_csv"]).all()
    assert np.allclose(merged["share_uncertain"], merged["n_uncertain"] / merged["n_cells"], atol=1e-4)
    ctl = tables["control_vs_death"].merge(csv, on=["well", "timepoint"], suffixes=("", "_csv"))
    assert np.allclose(ctl["control_area_fraction"], ctl["control_area_fraction_csv"], atol=1e-5)
    assert np.allclose(ctl["death_fraction"], (ctl["state_apoptotic_csv"] + ctl["state_dead_csv"]) / ctl["n_cells_csv"], atol=1e-4)
    r = np.corrcoef(ctl["control_area_fraction"], ctl["death_fraction"])[0, 1]
    assert f"Pearson r = {r:.3f}" in page
    last = csv.loc[csv.groupby("well")["timepoint"].idxmax()]
    pm = tables["plate_map"].merge(last, on="well", suffixes=("", "_csv"))
    assert np.allclose(pm["death_fraction"], (pm["state_apoptotic_csv"] + pm["state_dead_csv"]) / pm["n_cells_csv"], atol=1e-4)
    assert len(tables["counts"]) == len(csv)


@pytest.mark.timeout(600)
def test_report_images_gallery_and_overlays(report: tuple[Path, str]) -> None:
    out, page = report
    imgs = _pngs(page)
    assert len(imgs) >= 4 + 4  # four figures, overlays and gallery crops
    assert "differs from CSV" not in page and "differ from the CSV" not in page  # re-classified frames agree with the service's counts
    crops = re.findall(r"<div class='cell'><img alt='(\w+) cell'", page)
    assert crops and set(crops) <= set(STATES)
    overlays = sorted((out / "overlays" / "demo").glob("*.png"))
    assert len(overlays) == 2 * len(WELLS)  # --frames-per-well 2
    for p in overlays:
        assert p.relative_to(out).as_posix() in page
        rgb = cv2.imread(str(p))[..., ::-1]
        assert np.all(rgb == STATE_RGB["live"], axis=-1).sum() > 50
    for w in WELLS:
        assert f"id='ov-{w}'" in page and f"href='#ov-{w}'" in page


@pytest.mark.timeout(600)
def test_report_from_csv_alone_with_extra_columns(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(demo / "state" / "counts.csv", dtype=str, keep_default_na=False)
    df["n_unknown"] = [str(i % 2) for i in range(len(df))]
    df["index_version"] = "idx-7f3a"
    df["marker_agreement"] = [f"{0.5 + 0.05 * i:.2f}" for i in range(len(df))]
    src = tmp_path / "counts.csv"
    df.to_csv(src, index=False)
    assert main(["report", str(src), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "demo.html").read_text()
    assert "No gallery: built from the CSV alone" in page
    assert "no gallery" in capsys.readouterr().err
    assert "idx-7f3a" in page and "<h3>marker_agreement</h3>" in page
    tables = _downloads(page)
    tc = tables["timecourse"]
    assert np.allclose(tc["share_unknown"], tc["n_unknown"] / tc["n_cells"], atol=1e-4)
    assert np.allclose(sorted(tables["further_columns"]["marker_agreement"]), sorted(df["marker_agreement"].astype(float)))
    _pngs(page)


def test_report_refuses_what_is_not_a_counts_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["report", str(bad), "--out", str(tmp_path / "r")]) == 65
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cellmonitor: error: {bad}: not a cellmonitor counts CSV (missing columns: experiment, well, field, timepoint, n_cells)"]
    assert main(["report", str(tmp_path / "none.csv"), "--out", str(tmp_path / "r")]) == 66


@pytest.mark.timeout(600)
def test_overlay_command_one_and_several_frames(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frames = sorted((demo / "input").glob("demo_A1_f1_t00*_phase.tif"))
    png = tmp_path / "one.png"
    assert main(["overlay", str(frames[-1]), "--config", str(demo / "demo.toml"), "--out", str(png)]) == 0
    line = capsys.readouterr().out.strip()
    n = int(re.search(r": (\d+) cells", line).group(1))
    rgb = cv2.imread(str(png))[..., ::-1]
    assert rgb.shape[:2] == (696, 696)  # 560 px at 0.4 um/px, drawn at the pipeline's 0.322 um/px
    coloured = {s: int(np.all(rgb == STATE_RGB[s], axis=-1).sum()) for s in STATES}
    assert sum(v > 100 for v in coloured.values()) >= 2 and n >= 5  # late frame: several states outlined
    bottom = rgb[-60:]
    assert max(int(np.all(row == 255, axis=-1).sum()) for row in bottom) >= round(20 / 0.322) - 1  # the scale bar
    folder = tmp_path / "many"
    shutil.rmtree(folder, ignore_errors=True)
    assert main(["overlay", *map(str, frames[:2]), "--config", str(demo / "demo.toml"), "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{f.stem}.overlay.png" for f in frames[:2])


def test_report_shows_unreliable_counts_in_a_banner_and_the_summary(demo: Path, tmp_path: Path) -> None:
    """Every cell of a frame unknown: the page says so where people look, not only in a CSV column."""
    df = pd.read_csv(demo / "state" / "counts.csv", dtype=str, keep_default_na=False)
    df["n_unknown"] = ["0"] * len(df)
    df.loc[0, "n_unknown"] = df.loc[0, "n_cells"]  # one frame: all its cells unknown
    src = tmp_path / "counts.csv"
    df.to_csv(src, index=False)
    assert main(["report", str(src), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "demo.html").read_text()
    assert "Counts unreliable in 1 frame(s)" in page and f"{df.loc[0, 'well']} t{df.loc[0, 'timepoint']}" in page
    assert "unknown share" in page and "uncertain share" in page
    df["n_unknown"] = "0"
    df.to_csv(src, index=False)
    assert main(["report", str(src), "--out", str(tmp_path / "r2")]) == 0
    assert "Counts unreliable" not in (tmp_path / "r2" / "demo.html").read_text()


def test_report_with_one_acquisition_time_falls_back_to_timepoints_and_says_so(demo: Path, tmp_path: Path) -> None:
    """Every frame stamped with the same time: the axes use timepoint numbers (not all at x = 0), the
    page says so, and no "Pearson r = nan" is printed where the figure says the correlation is undefined."""
    df = pd.read_csv(demo / "state" / "counts.csv", dtype=str, keep_default_na=False)
    df["acquired_at"] = "2026-01-01T10:00:00+00:00"
    df["control_area_fraction"] = "0.1"  # a control that does not vary: no correlation to report
    src = tmp_path / "counts.csv"
    df.to_csv(src, index=False)
    assert main(["report", str(src), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "demo.html").read_text()
    assert "Every frame has the same acquisition time: time axes show the timepoint number instead." in page
    import re

    assert not re.findall(r".{120}= nan", page), re.findall(r".{120}= nan", page)[:2]
    assert "correlation undefined" in page
    tc = _downloads(page)["timecourse"]
    assert "hours" not in tc.columns


def test_report_keeps_the_instruments_local_time(demo: Path, tmp_path: Path) -> None:
    """Gen5 writes local time with no zone: the report shows it as written (never '+00:00') and says
    whose clock it is; zoned times (Nanolive, OME) are shown in UTC."""
    df = pd.read_csv(demo / "state" / "counts.csv", dtype=str, keep_default_na=False)
    tps = sorted({int(t) for t in df["timepoint"]})
    df["acquired_at"] = [f"2024-11-28T{11 + tps.index(int(t)):02d}:10:10" for t in df["timepoint"]]
    src = tmp_path / "counts.csv"
    df.to_csv(src, index=False)
    assert main(["report", str(src), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "demo.html").read_text()
    assert "the instrument&#x27;s local time" in page or "the instrument's local time" in page
    tc = _downloads(page)["timecourse"]
    assert set(tc["acquired_at"]) == {f"2024-11-28T{11 + i:02d}:10:10" for i in range(len(tps))}
    assert "+00:00" not in " ".join(tc["acquired_at"])
    df["acquired_at"] = [f"2024-11-28T{11 + tps.index(int(t)):02d}:10:10+01:00" for t in df["timepoint"]]
    df.to_csv(src, index=False)
    assert main(["report", str(src), "--out", str(tmp_path / "r2")]) == 0
    page = (tmp_path / "r2" / "demo.html").read_text()
    assert "local time" not in page
    assert set(_downloads(page)["timecourse"]["acquired_at"]) == {f"2024-11-28T{10 + i:02d}:10:10+00:00" for i in range(len(tps))}
