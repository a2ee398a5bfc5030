"""The label-free recipe of config/mcf7_pi.toml end to end: the morphology encoder measures each cell in
its frame at `index build --from-marker`, a logistic projection is learned there, and the service's
replay calls each cell with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.fields import NUCLEI, PI_RULE_TOML, masks_setup, write_field

from monitor.cli.main import main


def morphology_setup(root: Path) -> Path:
    cfg = masks_setup(root, '[[encoders]]\nname = "morphology"')
    text = cfg.read_text()
    text = text.replace('[classifier]\nindex = "index"', '[classifier]\nindex = "index"\nroles = { live = "live", dead = "dead" }')
    text += '\n[fit]\nprojection = "logistic"\n\n[[sinks]]\nname = "csv"\n\n[[sinks]]\nname = "cells"\n' + PI_RULE_TOML
    cfg.write_text(text)
    (root / "train").mkdir()
    for i in range(4):
        write_field(root / "train", f"exp{i}_snap_0_1_{i}")
    return cfg


@pytest.mark.timeout(300)
def test_morphology_references_from_the_marker_and_the_replay_calls_them(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from cellmonitor_plugins.sinks.cells import read_cells

    cfg = morphology_setup(tmp_path)
    index = tmp_path / "index"
    assert main(["index", "build", str(tmp_path / "train"), "--from-marker", str(cfg), "--out", str(index), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "conditioning logistic projection (penalty 0.01)" in err
    assert "cross-validated at build (4 folds by experiment, 20 references): balanced accuracy 1.00" in err
    meta = json.loads((index / "meta.json").read_text())
    (enc,) = meta["encoders"]
    assert enc["name"] == "morphology" and enc["dim"] == 75
    assert meta["conditioning"]["method"] == "standardise-logistic" and meta["conditioning"]["dim"] == 1
    assert meta["class_counts"] == {"live": 12, "dead": 8}
    # the references scored against the marker by a cross-validation by experiment at build
    cv = meta["preprocessing"]["marker_cv"]
    assert (cv["unit"], cv["folds"], cv["references"], cv["balanced_accuracy"]) == ("experiment", 4, 20, 1.0)
    # new fields, the dead nuclei elsewhere: the replay calls each from its brightfield measurements
    (tmp_path / "in").rmdir()
    (tmp_path / "in").mkdir()
    swapped = tuple((lab, cy, cx, not dead) for lab, cy, cx, dead in NUCLEI)
    write_field(tmp_path / "in", "new_snap_0_2_1", swapped)
    write_field(tmp_path / "in", "new_snap_0_2_2")
    assert main(["replay", str(cfg), "--no-metrics"]) == 0
    cells = read_cells(tmp_path / "state" / "cells")
    assert len(cells) == 10
    for _, row in cells.iterrows():  # the label-free call matches the PI verdict on every cell
        assert row["state"] == row["marker_state"], row.to_dict()
    # the report tells the biologist how far these calls go against the marker (the build's cross-validation)
    assert main(["report", str(cfg), "--out", str(tmp_path / "report"), "--no-gallery"]) == 0
    page = next((tmp_path / "report").glob("*.html")).read_text()
    assert "Label-free calls vs the marker, cross-validated at build (4 folds by experiment, 20 references): balanced accuracy 1.00" in page
    # and how the label-free calls follow the marker's strength, read back from the table the report wrote
    import pandas as pd

    assert "Label-free calls by marker strength" in page
    by = pd.read_csv(next((tmp_path / "report" / "data").glob("*/calls_by_marker.csv")))
    assert list(by["marker value"]) == ["<= 3 (marker-negative)", "3 to 25 (ambiguous)", "25 to 50", "50 to 100", ">= 100"]
    dead_pi = cells["marker_dead_nuclei_channel"][cells["marker_state"] == "dead"]
    assert by["cells"].sum() == 10 and by["cells"].iloc[0] == (cells["marker_state"] == "live").sum()
    assert by["cells"].iloc[-1] == (dead_pi >= 100).sum() > 0
    shares = dict(zip(by["marker value"], by["share called that state label-free"], strict=True))
    assert shares["<= 3 (marker-negative)"] == 0.0 and shares[">= 100"] == 1.0  # every call matched the marker above


@pytest.mark.realdata
@pytest.mark.timeout(600)
def test_documented_mcf7_workflow_on_real_fields(shared_data: Path, tmp_path: Path) -> None:
    """config/mcf7_pi.toml as shipped, on the real brightfield + PI fields: references from the
    training experiments through `--from-marker`, the service's replay of other experiments (the
    validation split: the test experiments stay unread), every call the same as the direct path,
    and label-free calls that agree with PI far above chance (0.711 when measured; floor 0.65)."""
    import sys

    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo))
    try:
        from bench.bench_marker_truth import CONFIG, fields, run_variant, split
    finally:
        sys.path.remove(str(repo))
    if not (shared_data / "bf_pi_mcf7").is_dir():
        pytest.skip("bf_pi_mcf7 not in the shared data")
    rest, _test = split(fields(), 1)
    train, val = split(rest, 2)
    r = run_variant("documented", train, val, CONFIG, tmp_path)
    same, n = (int(v) for v in r["service_equals_direct"].split("/"))
    assert n > 300 and same == n
    assert r["ba"] >= 0.65 and r["knn20_ba"] < r["ba"]


def test_corrections_to_a_frame_encoder_index_are_measured_in_their_frames(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """An expert's frame,cell,state rows are embedded in the cell's frame (as the service embeds it);
    a crop image, which has no frame, is refused with one line saying what to give instead."""
    import logging

    import numpy as np

    from monitor.config import load_config
    from monitor.imaging import rescale
    from monitor.intake.assemble import merge
    from monitor.intake.readers import build_readers
    from monitor.protocols import context_from
    from monitor.registry import Registry
    from monitor.service.feedback import Feedback
    from monitor.service.wiring import build_pipeline

    cfg_path = morphology_setup(tmp_path)
    assert main(["index", "build", str(tmp_path / "train"), "--from-marker", str(cfg_path), "--out", str(tmp_path / "index"), "--no-progress"]) == 0
    cfg = load_config(cfg_path)
    reg = Registry(cfg.plugins.paths)
    ctx = context_from(cfg, device="cpu")
    pipe = build_pipeline(cfg, reg, ctx)
    readers = build_readers(cfg, reg, ctx)
    write_field(tmp_path / "in", "fb_snap_0_3_1")
    fb = Feedback(tmp_path / "feedback", tmp_path / "index", pipe, readers, tmp_path / "in", stable_s=0.0, interval_s=0.0)
    (tmp_path / "feedback" / "dead").mkdir(parents=True)
    (tmp_path / "feedback" / "review.csv").write_text("frame,cell,state\nfb_snap_0_3_1.tif,9,dead\n")
    import tifffile

    tifffile.imwrite(tmp_path / "feedback" / "dead" / "crop.tif", np.zeros((24, 24), np.uint8))
    with caplog.at_level(logging.WARNING):
        assert fb.poll() == 1
    assert "has no frame, and encoder morphology measures each cell in its frame" in caplog.text
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "crop.tif" in warned[0].getMessage()
    index = pipe.classifier.index  # type: ignore[attr-defined]
    added = index._corr[0][-1]
    frame = rescale(merge([readers.choose(tmp_path / "in" / "fb_snap_0_3_1.tif").read(tmp_path / "in" / "fb_snap_0_3_1.tif")], "auto", "none"),
                    pipe.pixel_size_um)
    cells = pipe.segmenter.segment(frame)
    (cell9,) = [c for c in cells.cells if c.id == 9]
    from monitor.records import Cells

    expected = pipe.encoders[0].encode_cells(frame, Cells(cells.labels, (cell9,), cells.pixel_size_um))[0]
    np.testing.assert_allclose(added, expected, rtol=1e-5, atol=1e-5)


def test_a_folder_of_crops_cannot_be_a_frame_encoders_references(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import tifffile

    for cls in ("live", "dead"):
        (tmp_path / "refs" / cls).mkdir(parents=True)
        for i in range(3):
            tifffile.imwrite(tmp_path / "refs" / cls / f"{i}.tif", np.full((32, 32), 40 * i, np.uint8))
    code = main(["index", "build", str(tmp_path / "refs"), "--encoders", "morphology", "--out", str(tmp_path / "idx"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and not (tmp_path / "idx").exists()
    assert "encoder morphology measures each cell in its frame" in err and "--from-marker" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1


def test_the_configs_ewc_range_builds_the_index_and_an_impossible_one_is_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--from-marker builds the index with the config's [classifier] k_min and threshold (8 dead
    references here, far fewer than k_min 40: k_max is raised to it). An index whose k_max is below
    the config's k_min is refused by check-config and by run with the same line, before any frame."""
    cfg = morphology_setup(tmp_path)
    cfg.write_text(cfg.read_text().replace('roles = { live = "live", dead = "dead" }',
                                           'roles = { live = "live", dead = "dead" }\nk_min = 40\nentropy_threshold = 0.7'))
    index = tmp_path / "index"
    assert main(["index", "build", str(tmp_path / "train"), "--from-marker", str(cfg), "--out", str(index), "--no-progress"]) == 0
    ewc = json.loads((index / "meta.json").read_text())["ewc"]
    assert (ewc["k_min"], ewc["k_max"], ewc["entropy_threshold"]) == (40, 40, 0.7)
    assert main(["check-config", str(cfg)]) == 0
    # the same index under a config that asks for more neighbours than it allows
    cfg.write_text(cfg.read_text().replace("k_min = 40", "k_min = 80"))
    capsys.readouterr()
    assert main(["check-config", str(cfg)]) != 0
    checked = capsys.readouterr().err
    assert "[classifier] k_min = 80 but the index's k_max is 40" in checked
    assert main(["run", str(cfg)]) != 0
    ran = capsys.readouterr().err
    assert "[classifier] k_min = 80 but the index's k_max is 40" in ran


def test_references_the_label_free_channel_cannot_tell_apart_say_so_at_build(tmp_path: Path, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    """Brightfield that carries nothing about death (every nucleus the same grey, PI as before): the
    build's cross-validation says the calls agree with the marker no better than chance, and the
    service repeats it in its first lines."""
    import tifffile

    cfg = morphology_setup(tmp_path)
    for i in range(4, 8):
        write_field(tmp_path / "train", f"exp{i}_snap_0_1_{i}")
    for tif in (tmp_path / "train").glob("*_snap_*[0-9].tif"):
        stack = tifffile.imread(tif)
        labels = tifffile.imread(tif.with_name(tif.stem + "_labelled.tif"))
        stack[0][labels > 0] = 36000  # one grey for live and dead nuclei alike
        tifffile.imwrite(tif, stack, photometric="rgb", planarconfig="separate")
    assert main(["index", "build", str(tmp_path / "train"), "--from-marker", str(cfg), "--out", str(tmp_path / "index"), "--no-progress"]) == 0
    cv = json.loads((tmp_path / "index" / "meta.json").read_text())["preprocessing"]["marker_cv"]
    assert cv["folds"] == 5 and cv["references"] == 40 and cv["balanced_accuracy"] <= 0.7
    assert "label-free calls vs the marker, cross-validated at build (5 folds by experiment" in capsys.readouterr().err
    import logging

    from monitor.config import load_config
    from monitor.protocols import context_from
    from monitor.registry import Registry
    from monitor.service.wiring import build_pipeline

    c = load_config(cfg)
    with caplog.at_level(logging.INFO, logger="monitor.service.wiring"):
        build_pipeline(c, Registry(c.plugins.paths), context_from(c, device="cpu"))
    assert f"balanced accuracy {cv['balanced_accuracy']:.2f}" in caplog.text and "cross-validated at build" in caplog.text
