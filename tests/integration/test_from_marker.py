"""`cellmonitor index build --from-marker`: references labelled by the demo's Apo-15 channel, no hand labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monitor.cli.main import main
from monitor.demo.run import DEMO_CONFIG, FIELD_PX, FRAME_UM, write_frame
from monitor.demo.synthetic import make_cells, render_field


def _time_lapse(folder: Path, n_t: int, seed: int) -> dict[tuple[str, int], list[str]]:
    rng = np.random.default_rng(seed)
    truth = {}
    for wi, w in enumerate(("B1", "B2")):
        cells = make_cells(12, FIELD_PX * FRAME_UM, rng, onset_scale=(2.0 if wi == 0 else 6.0), n_timepoints=n_t)
        for t in range(1, n_t + 1):
            phase, fluo, st = render_field(cells, t - 1, (FIELD_PX, FIELD_PX), FRAME_UM, seed * 100 + t * 10 + wi)
            write_frame(folder, w, t, phase, fluo)
            truth[(w, t)] = st
    return truth


@pytest.mark.timeout(600)
def test_index_from_the_marker_alone(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "demo.toml"
    cfg.write_text(DEMO_CONFIG)
    frames = tmp_path / "calibration"
    frames.mkdir()
    truth = _time_lapse(frames, 4, seed=3)
    (frames / "junk.tif").write_bytes(b"not a tiff")
    assert main(["index", "build", "--from-marker", str(cfg), str(frames), "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "junk.tif" in err  # one line for the unreadable file, the rest goes on
    assert "rule: apo15 > 45 (SNR) -> dead" in err and "rule: apo15 > 10 (SNR) -> apoptotic" in err
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["preprocessing"]["source"] == "marker"
    assert [r["state"] for r in meta["preprocessing"]["marker"]["rules"]] == ["dead", "apoptotic"]
    counts = meta["class_counts"]
    assert set(counts) == {"live", "apoptotic", "dead"} and all(n > 0 for n in counts.values())
    # the marker's labels against the generator's truth (necrotic cells are marker-positive too)
    every = [s for st in truth.values() for s in st]
    n_true = {s: every.count(s) for s in ("live", "apoptotic", "necrotic", "dead")}
    assert counts["live"] == pytest.approx(n_true["live"], abs=0.1 * n_true["live"] + 2)
    assert counts["dead"] == pytest.approx(n_true["dead"], abs=0.15 * n_true["dead"] + 2)
    assert counts["apoptotic"] == pytest.approx(n_true["apoptotic"] + n_true["necrotic"], abs=0.2 * (n_true["apoptotic"] + n_true["necrotic"]) + 2)
    # the service takes the index (its encoders are the config's) and checks agreement with the same rules
    from monitor.config import load_config
    from monitor.protocols import BuildContext
    from monitor.registry import Registry
    from monitor.service.wiring import build_pipeline

    c = load_config(cfg).model_copy()
    c = c.model_copy(update={"classifier": c.classifier.model_copy(update={"index": tmp_path / "idx"})})
    pipe = build_pipeline(c, Registry([]), BuildContext(state_dir=tmp_path / "state"))
    assert pipe.marker is not None and pipe.classifier.classes == ("live", "apoptotic", "dead")


def test_without_rules_or_marker_frames_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.toml"
    cfg.write_text(DEMO_CONFIG.split("\n[marker]")[0])
    (tmp_path / "f").mkdir()
    _time_lapse(tmp_path / "f", 1, seed=1)
    assert main(["index", "build", "--from-marker", str(cfg), str(tmp_path / "f"), "--out", str(tmp_path / "i"), "--no-progress"]) == 78
    assert "no [[marker.rules]]" in capsys.readouterr().err
    assert main(["index", "build", "--from-marker", str(tmp_path / "nothing"), "--out", str(tmp_path / "i")]) == 78
    assert "neither" in capsys.readouterr().err
    # a folder without --config: the rules are missing, said before any frame is read
    assert main(["index", "build", "--from-marker", str(tmp_path / "f"), "--out", str(tmp_path / "i")]) == 78
    assert "--config" in capsys.readouterr().err
    # a calibration run in which no cell dies: one state only is refused
    good = tmp_path / "demo.toml"
    good.write_text(DEMO_CONFIG)
    assert main(["index", "build", "--from-marker", str(good), str(tmp_path / "f"), "--out", str(tmp_path / "i"), "--no-progress"]) == 65
    err = capsys.readouterr().err
    assert "fewer than two states" in err and str(tmp_path / "f") in err
