"""The label-free recipe of config/mcf7_pi.toml end to end: the morphology encoder measures each cell in
its frame at `index build --from-marker`, a logistic projection is learned there, and the service's
replay calls each cell with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.fakeplugins import write_setup
from fixtures.fields import NUCLEI, PI_RULE_TOML, write_field

from monitor.cli.main import main


def morphology_setup(root: Path) -> Path:
    cfg = write_setup(root)
    text = cfg.read_text()
    text = text.replace('patterns = ["*.npy"]', 'patterns = ["*.tif", "!*_labelled.tif"]')
    text = text.replace('[reader]\nname = "fakeplugins:READER"\noptions = {  }',
                        "[reader]\nname = \"tiff\"\n[readers.tiff]\npattern = '^(?P<experiment>.+?)_snap_(?P<field>.+?)\\.tif$'")
    text = text.replace('[segmenter]\nname = "fakeplugins:SEGMENTER"\noptions = {  }', '[segmenter]\nname = "masks"')
    text = text.replace('[[encoders]]\nname = "fakeplugins:ENCODER"', '[[encoders]]\nname = "morphology"')
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
    assert "conditioning logistic projection (penalty 0.01)" in capsys.readouterr().err
    meta = json.loads((index / "meta.json").read_text())
    (enc,) = meta["encoders"]
    assert enc["name"] == "morphology" and enc["dim"] == 75
    assert meta["conditioning"]["method"] == "standardise-logistic" and meta["conditioning"]["dim"] == 1
    assert meta["class_counts"] == {"live": 12, "dead": 8}
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
