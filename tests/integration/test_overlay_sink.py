"""The optional overlay sink: a PNG per counted frame with cells outlined by state, in a bounded folder."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from cellmonitor_plugins.sinks.overlay import OverlaySink
from fixtures.service import blobs, drop, make_service, run_until

from monitor.report.overlay import class_colours


def _frame(bright: float) -> np.ndarray:
    img = blobs(3, bright)
    img[0, 0] = 1.0
    return img


def test_overlays_are_written_coloured_and_bounded(tmp_path: Path) -> None:
    svc, sink = make_service(tmp_path)
    svc.pipeline = replace(svc.pipeline, keep_calls=True)  # build_service does this for a sink that wants_calls
    overlays = OverlaySink(tmp_path / "ov", max_mb=1e-6, max_px=96)  # 1 byte: room for the newest only
    svc.recorder.sinks = [sink, overlays]
    watch = svc.settings.watch_dir
    drop(watch, "A1_t1_phase.npy", _frame(0.9))
    # the overlay sink writes after the list sink: wait on the overlay itself
    run_until(svc, lambda: len(sink.rows) == 1 and overlays.path_for(sink.rows[0]).is_file(), what="the first frame's overlay PNG")
    first = overlays.path_for(sink.rows[0])
    assert first.is_file()
    img = cv2.cvtColor(cv2.imread(str(first)), cv2.COLOR_BGR2RGB)
    assert max(img.shape[:2]) == 96
    dead = np.array(class_colours(("live", "dead"))["dead"])
    assert (np.abs(img.astype(int) - dead).sum(axis=2) < 40).sum() > 10  # the dead cells' outlines
    drop(watch, "A1_t2_phase.npy", _frame(0.9))
    # (the oldest is pruned in the same write, after the new PNG is in place; run_until joins the loop)
    run_until(svc, lambda: len(sink.rows) == 2 and overlays.path_for(sink.rows[1]).is_file(), what="the second frame's overlay PNG")
    svc.close()
    assert not first.exists() and overlays.path_for(sink.rows[1]).is_file()  # the oldest went over the budget


def test_a_configured_overlay_sink_is_fed_by_the_service(tmp_path: Path) -> None:
    from fixtures.fakeplugins import write_setup

    cfg = write_setup(tmp_path)
    text = cfg.read_text().replace("[plugins]", '[[sinks]]\nname = "csv"\n\n[[sinks]]\nname = "overlay"\noptions = { max_px = 128 }\n\n[plugins]')
    cfg.write_text(text)
    np.save(tmp_path / "in" / "A1_t1_phase.npy", _frame(0.9))
    r = subprocess.run([sys.executable, "-m", "monitor", "replay", str(cfg)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pngs = list((tmp_path / "state" / "overlays").rglob("*.png"))
    assert len(pngs) == 1 and pngs[0].name == "1_t00001.png"
