"""A lab points the service at an instrument's export folder and nothing else.

The real readers (chosen automatically), channel assembly, ledger and sinks,
with fake segmenter/encoder so the test stays fast.
"""

from __future__ import annotations

import threading
import tomllib
from pathlib import Path

from fixtures.service import make_service
from fixtures.vendor import write_gen5_plate

from monitor.intake.readers import build_readers
from monitor.protocols import BuildContext
from monitor.registry import Registry

REPO = Path(__file__).resolve().parents[2]


def test_gen5_plate_export_folder_is_counted_per_well_field_timepoint(tmp_path):
    export = tmp_path / "in"
    plate = write_gen5_plate(export)
    shipped = tomllib.loads((REPO / "config" / "lionheart.toml").read_text())
    data = {
        "service": {"watch_dir": "in", "state_dir": "state", "stable_s": 0.0, "metrics_port": 0},
        "reader": {"name": "auto"},
        "assembly": shipped["assembly"],
    }
    svc, sink = make_service(tmp_path, data=data, readers=lambda cfg: build_readers(cfg, Registry(), BuildContext(state_dir=tmp_path, experiment="x")))
    svc.run(threading.Event(), until_idle=True, observe=False)
    svc.close()
    n_frames = len(plate.wells) * len(plate.fields) * plate.timepoints
    assert len(sink.rows) == n_frames
    keys = {(c.key.experiment, c.key.well, c.key.field, c.key.timepoint) for c in sink.rows}
    assert len(keys) == n_frames
    assert {k[0] for k in keys} == {"241128_111010_Plate 1"}
    assert {k[1] for k in keys} == set(plate.wells)
    for c in sink.rows:
        assert c.missing_channels == ()
        assert c.control is not None and c.control.channel == "Texas Red"
        assert c.pixel_size_source == "metadata:gen5"
        assert abs(c.pixel_size_um - 0.322) < 1e-3  # rescaled onto the common grid
        assert len(c.sources) == 2
    assert not (tmp_path / "state" / "quarantine.csv").exists()


def test_nanolive_export_is_rescaled_and_grouped(tmp_path):
    from fixtures.vendor import write_nanolive_export

    export = tmp_path / "in"
    write_nanolive_export(export, timepoints=3)
    shipped = tomllib.loads((REPO / "config" / "nanolive.toml").read_text())
    data = {
        "service": {"watch_dir": "in", "state_dir": "state", "stable_s": 0.0, "metrics_port": 0},
        "reader": shipped["reader"],
        "readers": shipped["readers"],
        "assembly": shipped["assembly"],
    }
    svc, sink = make_service(tmp_path, data=data, readers=lambda cfg: build_readers(cfg, Registry(), BuildContext(state_dir=tmp_path)))
    svc.run(threading.Event(), until_idle=True, observe=False)
    svc.close()
    assert sorted(c.key.timepoint for c in sink.rows) == [1, 2, 3]
    for c in sink.rows:
        assert c.instrument == "nanolive" and c.pixel_size_source == "config"
        assert c.missing_channels == () and c.control is not None and c.control.channel == "Apo-15"
        assert c.pixel_size_um == 0.322
