"""Every built-in plugin passes the contract checks shipped in monitor.testing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from monitor.config import PluginRef
from monitor.errors import PluginError
from monitor.protocols import BuildContext
from monitor.records import Counts, Frame, FrameKey
from monitor.registry import Registry
from monitor.testing import check_encoder, check_reader, check_segmenter, check_sink


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry()


def ctx(tmp_path: Path) -> BuildContext:
    return BuildContext(state_dir=tmp_path)


def test_listing_never_crashes_and_reports_origin(reg):
    rows = reg.list_plugins()
    kinds = {r.kind for r in rows}
    assert kinds == {"readers", "segmenters", "encoders", "sinks"}
    assert all("entry point cellmonitor" in r.origin for r in rows)


def test_broken_site_plugin_is_a_one_line_error(tmp_path, reg):
    (tmp_path / "labplug.py").write_text("raise RuntimeError('oops in lab plugin')\n")
    reg2 = Registry([tmp_path])
    with pytest.raises(PluginError) as e:
        reg2.spec("segmenters", "labplug:PLUGIN")
    assert str(e.value) == "plugin 'labplug:PLUGIN' (group cellmonitor.segmenters): failed to load: RuntimeError: oops in lab plugin"


def test_site_plugin_by_module_attr(tmp_path):
    (tmp_path / "myseg.py").write_text(
        "from pydantic import BaseModel\n"
        "from monitor.testing import DiscSegmenter\n"
        "class Options(BaseModel):\n    min_area_um2: float = 1.0\n"
        "class PLUGIN:\n    name='myseg'\n    description='lab'\n    Options=Options\n"
        "    @staticmethod\n    def build(o, ctx):\n        return DiscSegmenter(o.min_area_um2)\n"
    )
    seg = Registry([tmp_path]).build("segmenters", PluginRef(name="myseg:PLUGIN"), BuildContext(state_dir=tmp_path))
    assert seg.min_area_um2 == 1.0


def test_tiff_reader_contract(tmp_path, reg):
    r = reg.build("readers", PluginRef(name="tiff", options={"pixel_size_um": 0.5}), ctx(tmp_path))
    good = tmp_path / "exp_B2_f3_t007_phase.tif"
    tifffile.imwrite(good, np.zeros((32, 32), np.uint16))
    bad = tmp_path / "exp_B2_f3_t008_phase.tif"
    bad.write_bytes(b"II*\x00garbage")
    acq = check_reader(r, good)
    assert (acq.key.well, acq.key.field, acq.key.timepoint) == ("B2", "3", 7)
    assert list(acq.channels) == ["phase"]
    from monitor.errors import NotReady

    with pytest.raises(NotReady) as e:  # a TIFF cut after its header may still be being written: retried
        r.read(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_classical_segmenter_contract(tmp_path, reg):
    seg = reg.build("segmenters", PluginRef(name="classical"), ctx(tmp_path))
    img = np.full((200, 200), 0.1, np.float32)
    yy, xx = np.mgrid[0:200, 0:200]
    img[(yy - 60) ** 2 + (xx - 60) ** 2 < 400] = 0.8
    img[(yy - 140) ** 2 + (xx - 140) ** 2 < 400] = 0.8
    img += np.random.default_rng(0).normal(0, 0.01, img.shape).astype(np.float32)
    f = Frame(FrameKey("e", "A1", "1", 0), {"phase": img}, "phase", None, 0.5, "config", "t")
    cells = check_segmenter(seg, f)
    assert len(cells) == 2


def test_efficientnet_lite0_real_weights_contract(tmp_path, reg):
    enc = reg.build("encoders", PluginRef(name="efficientnet-lite0"), ctx(tmp_path))
    v = check_encoder(enc, n=2)
    assert enc.dim == 1280 and "efficientnet-lite0@" in enc.id
    assert float(np.abs(v).sum()) > 0


def test_missing_weights_file_is_a_clear_error(tmp_path, reg):
    with pytest.raises(PluginError) as e:
        reg.build("encoders", PluginRef(name="efficientnet-lite1", options={"weights": str(tmp_path / "none.pth")}), ctx(tmp_path))
    assert "none.pth: EfficientNet-Lite1 weights file not found" in str(e.value)


@pytest.mark.parametrize("name", ["csv", "prometheus"])
def test_sinks_contract(tmp_path, reg, name):
    sink = reg.build("sinks", PluginRef(name=name), ctx(tmp_path))
    c = Counts(FrameKey("e", "A1", "1", 1), "t", None, 0.322, "config", 3, {"live": 2, "dead": 1}, 0, 0.9, None)
    check_sink(sink, c, _read_back(sink, tmp_path))
    if name == "csv":
        rows = (tmp_path / "counts.csv").read_text().splitlines()
        assert len(rows) == 2 and ",2,1," in rows[1]


def _read_back(sink, tmp_path):
    """What a built-in sink holds: the CSV's rows, or the gauges in the metrics registry."""
    import csv as _csv

    if sink.name == "csv":
        return lambda: list(_csv.DictReader((tmp_path / "counts.csv").open()))

    def gauges():
        rows: dict[str, dict] = {}
        for fam in sink.metrics.registry.collect():
            for s in fam.samples:
                if s.name == "cellmonitor_latest_cells":
                    r = rows.setdefault(s.labels["well"], {"well": s.labels["well"], "n_cells": 0})
                    r[s.labels["state"]] = int(s.value)
                    r["n_cells"] += int(s.value)
                elif s.name == "cellmonitor_latest_timepoint":
                    rows.setdefault(s.labels["well"], {"well": s.labels["well"], "n_cells": 0})["timepoint"] = int(s.value)
        return list(rows.values())

    return gauges


class _ForgetfulSink:
    """A sink whose write does nothing: the contract check must catch it."""

    name = "forgetful"
    record_of_truth = True

    def write(self, counts):
        pass

    def close(self):
        pass


class _DoublingCsv:
    """A record-of-truth sink that appends every write, even of the same frame."""

    name = "doubling"
    record_of_truth = True

    def __init__(self):
        self.rows = []

    def write(self, counts):
        self.rows.append({"well": counts.key.well, "timepoint": counts.key.timepoint, "n_cells": counts.n_cells, **counts.counts})

    def close(self):
        pass


def test_check_sink_catches_a_sink_that_keeps_nothing_or_doubles():
    c = Counts(FrameKey("e", "A1", "1", 1), "t", None, 0.322, "config", 3, {"live": 2, "dead": 1}, 0, 0.9, None)
    with pytest.raises(AssertionError, match="does not hold what was written"):
        check_sink(_ForgetfulSink(), c, lambda: [])
    d = _DoublingCsv()
    with pytest.raises(AssertionError, match="wrote the same frame 2 times"):
        check_sink(d, c, lambda: d.rows)


def test_vendor_readers_pass_the_shipped_contract(tmp_path, reg):
    from fixtures.vendor import truncated_copy, write_gen5_plate, write_nanolive_export

    plate = write_gen5_plate(tmp_path / "gen5")
    gen5 = reg.build("readers", PluginRef(name="gen5"), ctx(tmp_path))
    good = plate.files[0]
    acq = check_reader(gen5, good)
    assert acq.pixel_size_source == "metadata:gen5"
    nl = write_nanolive_export(tmp_path / "nl")
    nano = reg.build("readers", PluginRef(name="nanolive"), ctx(tmp_path))
    acq = check_reader(nano, nl.ri_files[0])
    assert acq.pixel_size_source == "config" and acq.pixel_size_um == 0.19
    from monitor.errors import NotReady

    with pytest.raises(NotReady):  # a half-written export is 'not ready', not broken
        gen5.read(truncated_copy(good, tmp_path / good.name))
