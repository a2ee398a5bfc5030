"""Brightfield + death-marker fields as a lab has them: a multi-plane TIFF per field whose planes a
JSON sidecar names, nuclei masks made by another tool beside it, the per-cell table.

The frames are synthetic (tifffile into tmp_path) with planted nuclei: each has a known mask id,
a brightfield look (dim: live, bright: dead, as the fake index knows them) and a PI value.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fixtures.fakeplugins import write_setup
from fixtures.fields import NUCLEI, PI_RULE_TOML, PX, write_field

from monitor.cli.main import main
from monitor.config import load_config
from monitor.errors import BadInput, NotReady
from monitor.records import Frame, FrameKey
from monitor.registry import Registry


def marker_setup(root: Path, *, deadline_s: float = 30, sinks: str = 'name = "cells"') -> Path:
    """A config with the real tiff reader, the masks segmenter, the fake encoder and index, the PI rule and the cells sink."""
    cfg = write_setup(root)
    text = cfg.read_text().replace("ready_deadline_s = 30", f"ready_deadline_s = {deadline_s}")
    text = text.replace('patterns = ["*.npy"]', 'patterns = ["*.tif", "!*_labelled.tif"]')
    text = text.replace('[reader]\nname = "fakeplugins:READER"\noptions = {  }',
                        "[reader]\nname = \"tiff\"\n[readers.tiff]\npattern = '^(?P<experiment>.+?)_snap_(?P<field>.+?)\\.tif$'")
    text = text.replace('[segmenter]\nname = "fakeplugins:SEGMENTER"\noptions = {  }', '[segmenter]\nname = "masks"')
    text += PI_RULE_TOML + f"""
[[sinks]]
name = "csv"

[[sinks]]
{sinks}
"""
    cfg.write_text(text)
    return cfg


def counts(state: Path) -> list[dict[str, str]]:
    p = state / "counts.csv"
    if not p.exists():
        return []
    with p.open(newline="") as f:
        return list(csv.DictReader(f))


def quarantined(state: Path) -> list[dict[str, str]]:
    p = state / "quarantine.csv"
    if not p.exists():
        return []
    with p.open(newline="") as f:
        return list(csv.DictReader(f))


# ---- the reader: planes named by a sidecar -------------------------------------------------------


def test_sidecar_names_the_planes_gives_roles_and_the_pixel_size(tmp_path):
    from cellmonitor_plugins.readers.tiff import Options, TiffReader

    path = write_field(tmp_path, "exp1_snap_0_1_4", extra_plane=True)
    acq = TiffReader(Options()).read(path)
    assert list(acq.channels) == ["brightfield_channel", "dead_nuclei_channel", "live_nuclei_channel", "plane3"]  # extra plane carried
    assert all(a.shape == (128, 128) and a.dtype == np.uint16 for a in acq.channels.values())
    assert acq.roles == {"brightfield_channel": "transmitted", "dead_nuclei_channel": "marker", "live_nuclei_channel": "nuclear", "plane3": "other"}
    assert (acq.pixel_size_um, acq.pixel_size_source) == (PX, "metadata:sidecar")
    # the planes are the right ones: the PI plane is bright where the dead nuclei are
    assert acq.channels["dead_nuclei_channel"][20, 60] > 400 and acq.channels["dead_nuclei_channel"][20, 20] < 200


def test_config_channels_name_the_planes_without_a_sidecar(tmp_path):
    from cellmonitor_plugins.readers.tiff import Options, TiffReader

    path = write_field(tmp_path, "exp1_snap_0_1_5", sidecar=False)
    acq = TiffReader(Options(channels=["bf", "pi", "hoechst"], pixel_size_um=PX)).read(path)
    assert list(acq.channels) == ["bf", "pi", "hoechst"] and acq.roles == {"bf": "transmitted", "pi": "marker", "hoechst": "nuclear"}


@pytest.mark.parametrize("sidecar, problem", [
    ({"channels": ["a", "b", "c", "d", "e"], "spatial_calibration": PX}, "names 5 planes (a, b, c, d, e) but the file holds 3"),
    ({"channels": "brightfield"}, "sidecar 'channels' must be a list of plane names"),
    ({"channels": ["a", "b", "c"], "spatial_calibration": -1}, "'spatial_calibration' must be a positive number"),
    ("not json {", "sidecar is not valid JSON"),
])
def test_a_bad_sidecar_is_one_line_naming_the_file(tmp_path, sidecar, problem):
    from cellmonitor_plugins.readers.tiff import Options, TiffReader

    path = write_field(tmp_path, "exp1_snap_0_1_6")
    (tmp_path / "exp1_snap_0_1_6.json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    with pytest.raises(BadInput) as e:
        TiffReader(Options(pixel_size_um=PX)).read(path)
    msg = str(e.value)
    assert "\n" not in msg and problem in msg and "exp1_snap_0_1_6" in msg


# ---- the masks segmenter -----------------------------------------------------------------------


def _frame(path: Path, shape=(128, 128)) -> Frame:
    return Frame(FrameKey("e", "-", "1", 1), {"bf": np.zeros(shape, np.uint16)}, "bf", None, PX, "config", "t", sources=(path,))


def test_masks_are_found_by_name_and_keep_their_ids(tmp_path):
    from cellmonitor_plugins.segmenters.masks import MaskSegmenter, Options

    path = write_field(tmp_path, "exp1_snap_0_1_7")
    cells = MaskSegmenter(Options()).segment(_frame(path))
    assert sorted(c.id for c in cells.cells) == [5, 9, 12, 30, 31]
    assert set(np.unique(cells.labels)) == {0, 5, 9, 12, 30, 31}
    # Cellpose's PNG masks are found the same way
    import cv2

    other = write_field(tmp_path, "exp1_snap_0_1_8", mask=False)
    m = np.zeros((128, 128), np.uint16)
    m[10:20, 10:20] = 3
    cv2.imwrite(str(tmp_path / "exp1_snap_0_1_8_cp_masks.png"), m)
    assert [c.id for c in MaskSegmenter(Options()).segment(_frame(other)).cells] == [3]


def test_masks_follow_the_rescale_to_the_common_pixel_size(tmp_path):
    from cellmonitor_plugins.segmenters.masks import MaskSegmenter, Options

    from monitor.imaging import rescale

    path = write_field(tmp_path, "exp1_snap_0_1_9")
    frame = rescale(_frame(path), PX * 2)  # a coarser common grid: 64 x 64
    cells = MaskSegmenter(Options()).segment(frame)
    assert cells.labels.shape == (64, 64) and sorted(c.id for c in cells.cells) == [5, 9, 12, 30, 31]


@pytest.mark.parametrize("write, kind, problem", [
    (None, NotReady, "no segmentation mask yet"),
    (lambda p: tifffile.imwrite(p, np.zeros((100, 128), np.uint16)), BadInput, "mask is 100x128 px but its frame is 128x128 px"),
    (lambda p: tifffile.imwrite(p, np.full((128, 128), 0.5, np.float32)), BadInput, "not a label image"),
    (lambda p: tifffile.imwrite(p, np.zeros((2, 128, 128), np.uint16)), BadInput, "not a label image"),
])
def test_a_missing_or_bad_mask_is_one_line_naming_the_mask(tmp_path, write, kind, problem):
    from cellmonitor_plugins.segmenters.masks import MaskSegmenter, Options

    path = write_field(tmp_path, "exp1_snap_0_1_10", mask=False)
    if write is not None:
        write(tmp_path / "exp1_snap_0_1_10_labelled.tif")
    with pytest.raises(kind) as e:
        MaskSegmenter(Options()).segment(_frame(path))
    assert problem in str(e.value) and "\n" not in str(e.value)
    assert "exp1_snap_0_1_10" in str(e.value)


# ---- the classical segmenter on a nuclear stain -----------------------------------------------


def test_classical_segmenter_on_a_named_channel_segments_that_plane(tmp_path):
    from cellmonitor_plugins.segmenters.classical import ClassicalSegmenter, Options

    size = 128
    yy, xx = np.mgrid[0:size, 0:size]
    nuc = np.full((size, size), 100.0)
    for cy, cx in ((30, 30), (30, 90), (90, 60)):
        nuc[(yy - cy) ** 2 + (xx - cx) ** 2 < 80] = 2000
    bf = np.full((size, size), 1000.0)  # a flat label-free plane: nothing to find there
    frame = Frame(FrameKey("e", "-", "1", 1), {"bf": bf.astype(np.uint16), "Hoechst": nuc.astype(np.uint16)}, "bf", None, PX, "config", "t",
                  sources=(tmp_path / "f.tif",))
    seg = ClassicalSegmenter(Options(mode="intensity", channel="hoechst", work_pixel_size_um=PX, min_area_um2=5))
    assert len(seg.segment(frame).cells) == 3
    with pytest.raises(BadInput, match="segmenter.options.channel 'DAPI' is not in this frame"):
        ClassicalSegmenter(Options(channel="DAPI")).segment(frame)


# ---- through the service -------------------------------------------------------------------------


def test_replay_counts_each_nucleus_and_writes_one_row_per_cell(tmp_path):
    cfg = marker_setup(tmp_path)
    write_field(tmp_path / "in", "exp1_snap_0_1_1")
    write_field(tmp_path / "in", "exp1_snap_0_2_2", nuclei=NUCLEI[:3])
    assert main(["replay", str(cfg), "--no-metrics"]) == 0
    state = tmp_path / "state"
    rows = counts(state)
    assert sorted(int(r["n_cells"]) for r in rows) == [3, 5]
    assert quarantined(state) == []  # the masks beside the frames were not taken for frames
    from cellmonitor_plugins.sinks.cells import read_cells

    cells = read_cells(state / "cells")
    assert len(cells) == 8
    first = cells[cells.field == "0_1_1"]
    assert sorted(first.label) == [5, 9, 12, 30, 31]  # the mask's own labels
    assert set(first.source) == {str(tmp_path / "in" / "exp1_snap_0_1_1.tif")}
    # the marker's verdict per nucleus, as planted; the fake index calls bright nuclei dead
    dead_ids = {lab for lab, _, _, dead in NUCLEI if dead}
    assert {int(r.label): r.marker_state for r in first.itertuples()} == {lab: ("dead" if lab in dead_ids else "live") for lab, *_ in NUCLEI}
    # each row's state is the call the counts CSV counted (the fake encoder's calls, whatever they are)
    row = next(r for r in rows if r["field"] == "0_1_1")
    assert (first.state == "dead").sum() == int(row["n_dead"]) and (first.state == "live").sum() == int(row["n_live"])
    assert ((first["class"] == first.state) & first.certainty.between(0, 1)).all()
    assert (first.marker_dead_nuclei_channel[first.marker_state == "dead"] >= 25).all()
    assert first.area_um2.between(50 * PX**2, 250 * PX**2).all()
    # a second replay finds both frames done: the table is unchanged, no row twice
    assert main(["replay", str(cfg), "--no-metrics"]) == 0
    assert len(read_cells(state / "cells")) == 8
    # the post-run export gathers the table into one file
    assert main(["export", str(cfg), "--out", str(tmp_path / "counts.csv"), "--cells", str(tmp_path / "cells.parquet")]) == 0
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "cells.parquet")) == 8


def test_a_frame_processed_again_rewrites_its_table_once(tmp_path):
    from cellmonitor_plugins.sinks.cells import CellTableSink, read_cells

    from monitor.records import CellCalls, Counts

    calls = CellCalls(np.zeros((8, 8)), np.zeros((8, 8), int), np.array([4, 7]), np.array([0, 1]), np.array([False, True]), ("live", "dead"),
                      PX, certainty=np.array([0.9, 0.4]), centroid_yx_px=np.array([[1.0, 2.0], [3.0, 4.0]]), area_um2=np.array([10.0, 12.0]))
    c = Counts(FrameKey("e", "A1", "1", 3), "t", None, PX, "config", 2, {"live": 1, "dead": 1}, 1, 0.65, None,
               sources=(Path("/x/f.tif"),), calls=calls)
    sink = CellTableSink(tmp_path / "cells", "both")
    sink.write(c)
    sink.write(c)  # the frame again (a restart before its ledger row was written)
    df = read_cells(tmp_path / "cells")
    assert list(df.label) == [4, 7] and list(df.state) == ["live", "dead"] and list(df.certainty) == [0.9, 0.4]
    assert list(df.centroid_x_um) == pytest.approx([2 * PX, 4 * PX])
    assert (tmp_path / "cells" / "e" / "A1" / "1_t00003.csv").exists()
    assert not list((tmp_path / "cells").rglob("*.tmp"))


def _service(cfg_path: Path):
    from monitor.service.wiring import build_service

    cfg = load_config(cfg_path)
    svc, _ = build_service(cfg, Registry(cfg.plugins.paths), serve_metrics=False)
    return svc


def _step_until(svc, done, timeout_s: float = 60.0) -> None:
    t0 = time.monotonic()
    while not done():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        svc.step()
        time.sleep(0.05)


def test_a_frame_waits_for_its_mask_then_is_counted(tmp_path):
    cfg = marker_setup(tmp_path)
    svc = _service(cfg)
    try:
        write_field(tmp_path / "in", "exp1_snap_0_1_1", mask=False)
        svc.backlog()
        _step_until(svc, lambda: svc._held)  # read, segmented: no mask yet, so the frame waits
        assert counts(tmp_path / "state") == [] and quarantined(tmp_path / "state") == []
        (tmp_path / "staging").mkdir()
        write_field(tmp_path / "staging", "exp1_snap_0_1_1")  # the other tool catches up: the same field's mask
        (tmp_path / "staging" / "exp1_snap_0_1_1_labelled.tif").rename(tmp_path / "in" / "exp1_snap_0_1_1_labelled.tif")
        _step_until(svc, lambda: counts(tmp_path / "state"))
        assert int(counts(tmp_path / "state")[0]["n_cells"]) == 5 and quarantined(tmp_path / "state") == []
    finally:
        svc.close()


def test_a_mask_that_never_comes_is_quarantined_at_the_deadline(tmp_path):
    cfg = marker_setup(tmp_path, deadline_s=1.0)
    svc = _service(cfg)
    try:
        write_field(tmp_path / "in", "exp1_snap_0_1_1", mask=False)
        svc.backlog()
        _step_until(svc, lambda: quarantined(tmp_path / "state"))
        (q,) = quarantined(tmp_path / "state")
        assert q["path"].endswith("exp1_snap_0_1_1.tif") and "no segmentation mask yet" in q["problem"] and "still unreadable after 1s" in q["problem"]
        assert counts(tmp_path / "state") == [] and not svc._held
    finally:
        svc.close()


def test_a_mask_of_another_size_quarantines_the_frame_in_one_line(tmp_path):
    cfg = marker_setup(tmp_path)
    write_field(tmp_path / "in", "exp1_snap_0_1_1", mask_shape=(64, 64))
    write_field(tmp_path / "in", "exp1_snap_0_1_2")
    assert main(["replay", str(cfg), "--no-metrics"]) == 0
    (q,) = quarantined(tmp_path / "state")
    assert q["stage"] == "segment" and "exp1_snap_0_1_1_labelled.tif: mask is 64x64 px but its frame is 128x128 px" in q["problem"]
    assert len(counts(tmp_path / "state")) == 1  # the other frame is counted


def test_masks_written_while_the_service_watches_are_never_frames(tmp_path):
    """The mask files arrive in the watched folder too: excluded by the patterns, never read as frames."""
    cfg = marker_setup(tmp_path)
    svc = _service(cfg)
    stop = threading.Event()
    worker = threading.Thread(target=svc.run, args=(stop,))
    worker.start()  # the real loop with the real watcher
    try:
        write_field(tmp_path / "in", "exp1_snap_0_1_1")
        t0 = time.monotonic()
        while not counts(tmp_path / "state"):
            assert time.monotonic() - t0 < 60, "the frame was not counted"
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(timeout=30)
        svc.close()
    assert quarantined(tmp_path / "state") == [] and len(counts(tmp_path / "state")) == 1
    assert svc.recorder.ledger.is_known(tmp_path / "in" / "exp1_snap_0_1_1.tif")
    assert not svc.recorder.ledger.is_known(tmp_path / "in" / "exp1_snap_0_1_1_labelled.tif")


def test_unreliable_frames_and_late_channels_are_warnings(tmp_path, caplog):
    """Half the cells unknown or uncertain, or a channel after its frame was counted: WARNING, not INFO."""
    import logging

    from monitor.records import Counts
    from monitor.service.recording import unreliable

    c = Counts(FrameKey("e", "A1", "1", 1), "t", None, PX, "config", 35, {"dead": 35}, 0, 0.9, None, n_unknown=35)
    assert unreliable(c) == "35 of 35 cells unknown (100%)"
    assert unreliable(Counts(FrameKey("e", "A1", "1", 1), "t", None, PX, "config", 10, {"live": 10}, 2, 0.9, None, n_unknown=1)) is None
    # the dashboard sees it too: the well's unreliable share (and a Grafana panel counting such wells)
    from prometheus_client import CollectorRegistry

    from monitor.service.metrics import ServiceMetrics

    m = ServiceMetrics(CollectorRegistry())
    m.observe_counts(c)
    assert m.registry.get_sample_value("cellmonitor_unreliable_share", {"instrument": "t", "experiment": "e", "well": "A1"}) == 1.0
    cfg = marker_setup(tmp_path)
    svc = _service(cfg)
    try:
        write_field(tmp_path / "in", "exp1_snap_0_1_1")
        svc.backlog()
        _step_until(svc, lambda: counts(tmp_path / "state"))
        (tmp_path / "in" / "again").mkdir()  # another file of the same (counted) frame, in a subfolder
        late = tmp_path / "in" / "again" / "exp1_snap_0_1_1.tif"
        late.write_bytes((tmp_path / "in" / "exp1_snap_0_1_1.tif").read_bytes())
        late.with_suffix(".json").write_text((tmp_path / "in" / "exp1_snap_0_1_1.json").read_text())
        with caplog.at_level(logging.INFO, logger="monitor.service.recording"):
            svc.backlog()
            _step_until(svc, lambda: svc.recorder.ledger.is_known(late))
        warned = [r for r in caplog.records if "arrived after frame" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING and "replay" in warned[0].getMessage()
        assert svc.metrics.files.labels("late")._value.get() == 1
        # the frame's own file read a second time (a duplicate event while its frame was processed) is not late
        caplog.clear()
        row = counts(tmp_path / "state")[0]
        key = FrameKey(row["experiment"], row["well"], row["field"], int(row["timepoint"]))
        assert svc.recorder.ledger.frame_done(key)
        with caplog.at_level(logging.INFO, logger="monitor.service.recording"):
            assert svc.recorder.note_read(tmp_path / "in" / "exp1_snap_0_1_1.tif", key) is False
        assert "read again; frame" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert svc.metrics.files.labels("late")._value.get() == 1
    finally:
        svc.close()
