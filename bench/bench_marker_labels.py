"""References labelled by the death marker vs by hand, on the demo's synthetic time-lapse.

    .venv/bin/python bench/bench_marker_labels.py [--timepoints 8] [--write bench/results/marker_labels.md]

Protocol (everything through the command line and the service's components):

1. A *calibration run*: the demo's synthetic microscope writes a time-lapse
   (2 wells, phase + Apo-15 TIFFs, its own seed) into a folder; the index is
   built from it with ``cellmonitor index build --from-marker demo.toml DIR``
   (the demo config's ``[marker]`` rules; no hand label anywhere).
2. The *hand-labelled* index is the demo's own (single-state reference
   fields, labelled by construction: what a person labelling cells gives).
3. Both classify the cells of the demo's time-lapse (another seed: the frames
   ``cellmonitor demo`` shows), segmented, cropped and embedded once by the
   service's pipeline; each segment is matched to its true cell by centre.
   Reported: accuracy against the truth (4 states; the marker index has no
   ``necrotic`` class, the rules name none), the same with necrotic counted
   as apoptotic (both on the death path before death), and the per-frame
   agreement between classifier and marker as the service reports it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.config import load_config  # noqa: E402
from monitor.demo.run import DEMO_CONFIG, FIELD_PX, FRAME_UM, STATES, build_reference, write_frame  # noqa: E402
from monitor.demo.synthetic import SynthCell, make_cells, render_field  # noqa: E402


def time_lapse(folder: Path | None, wells: tuple[str, ...], n_t: int, cells: int, seed: int) -> list[tuple[str, int, np.ndarray, np.ndarray, list[SynthCell], list[str]]]:
    """The demo's plates over time (same generator as ``cellmonitor demo``); written to ``folder`` if given."""
    rng = np.random.default_rng(seed)
    field_um = FIELD_PX * FRAME_UM
    plates = {w: make_cells(cells, field_um, rng, onset_scale=(3.0 if i == 0 else 9.0), n_timepoints=n_t) for i, w in enumerate(wells)}
    out = []
    for t in range(1, n_t + 1):
        for wi, w in enumerate(wells):
            phase, fluo, st = render_field(plates[w], t - 1, (FIELD_PX, FIELD_PX), FRAME_UM, seed * 1000 + t * 10 + wi)
            if folder is not None:
                write_frame(folder, w, t, phase, fluo)
            out.append((w, t, phase, fluo, plates[w], st))
    return out


def evaluate(pipeline, indexes: dict[str, object], frames) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """Per-cell accuracy of each index against the truth (segments matched to true cells by centre)."""
    import tomllib

    from monitor.config import parse_config
    from monitor.demo.run import on_true_cells
    from monitor.imaging import crop_cells
    from monitor.index.ewc import EWCClassifier
    from monitor.marker import MarkerCheck, resolve
    from monitor.pipeline import embed
    from monitor.records import FrameKey
    from monitor.service.rows import class_roles

    rules = resolve(parse_config(tomllib.loads(DEMO_CONFIG)).marker.model_dump())
    truth_all: list[str] = []
    pred: dict[str, list[str]] = {k: [] for k in indexes}
    agree: dict[str, list[float]] = {k: [] for k in indexes}
    for w, t, phase, fluo, cells, st in frames:
        frame, sub, true = on_true_cells(pipeline, phase, fluo, cells, FrameKey("eval", w, "1", t))
        if not len(sub):
            continue
        truth = [st[j] for j in true]
        emb = embed(crop_cells(frame, sub, pipeline.crop_px, pipeline.blank_background), pipeline.encoders, pipeline.batch_size)
        truth_all += truth
        for name, index in indexes.items():
            states = EWCClassifier(index).classify(emb)  # type: ignore[arg-type]
            pred[name] += [states.label(i) for i in range(len(states))]
            m = MarkerCheck(rules, class_roles(index.classes)).agreement(frame, sub, states)  # type: ignore[attr-defined]
            if m is not None and m.n_labelled:
                agree[name].append(m.fraction)
    y = np.array(truth_all)
    out = {}
    for name in indexes:
        p = np.array(pred[name])
        death_path = {"necrotic": "apoptotic"}
        yy = np.array([death_path.get(s, s) for s in y])
        pp = np.array([death_path.get(s, s) for s in p])
        out[name] = {
            "cells": float(len(y)),
            "accuracy": float((p == y).mean()),
            "accuracy_necrotic_as_apoptotic": float((pp == yy).mean()),
            "macro": float(np.mean([(p[y == s] == s).mean() for s in STATES if (y == s).any()])),
            "agreement": float(np.mean(agree[name])) if agree[name] else float("nan"),
        }
    return out


def run(n_t: int = 8, cells: int = 16, per_state: int = 30, say=print, build_args: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, float]], str]:  # type: ignore[no-untyped-def]
    from monitor.index.store import ReferenceIndex
    from monitor.protocols import BuildContext
    from monitor.registry import Registry
    from monitor.service.wiring import pipeline_without_index

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cfg_path = root / "demo.toml"
        cfg_path.write_text(DEMO_CONFIG)
        os.chdir(root)
        cfg = load_config(cfg_path)
        pipeline = pipeline_without_index(cfg, Registry([]), BuildContext(state_dir=root / "state"))
        calib = root / "calibration"
        calib.mkdir()
        time_lapse(calib, ("B1", "B2"), n_t, cells, seed=11)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "monitor", "-q", "index", "build", "--from-marker", str(cfg_path), str(calib), "--out", str(root / "marker-index"),
                            "--no-progress", *build_args], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"index build --from-marker failed ({r.returncode}): {r.stderr}")
        build_log = r.stderr.strip()
        say(build_log)
        say(f"marker index built in {time.perf_counter() - t0:.1f} s")
        hand = build_reference(pipeline, per_state, 7, lambda s: None)
        marker = ReferenceIndex.load(root / "marker-index")
        frames = time_lapse(None, ("A1", "A2"), n_t, cells, seed=7)
        return evaluate(pipeline, {"hand-labelled (demo)": hand, "marker-labelled": marker}, frames), build_log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timepoints", type=int, default=8)
    ap.add_argument("--write", type=Path, default=None)
    a = ap.parse_args()
    here = Path.cwd()
    res, build_log = run(a.timepoints)
    os.chdir(here)
    lines = [
        "| index | cells | accuracy (4 states) | accuracy (necrotic as apoptotic) | macro (4 states) | classifier-marker agreement per frame (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in res.items():
        lines.append(f"| {name} | {m['cells']:.0f} | {m['accuracy']:.3f} | {m['accuracy_necrotic_as_apoptotic']:.3f} | {m['macro']:.3f} | {m['agreement']:.3f} |")
    h, mk = res["hand-labelled (demo)"], res["marker-labelled"]
    lines.append("")
    lines.append(f"marker - hand: {100 * (mk['accuracy'] - h['accuracy']):+.1f} points (4 states), "
                 f"{100 * (mk['accuracy_necrotic_as_apoptotic'] - h['accuracy_necrotic_as_apoptotic']):+.1f} points (necrotic as apoptotic)")
    table = "\n".join(lines)
    print(table)
    if a.write:
        a.write.parent.mkdir(parents=True, exist_ok=True)
        a.write.write_text(f"# Marker-labelled vs hand-labelled references (demo time-lapse)\n\n`{' '.join(sys.argv)}`\n\n"
                           f"`index build --from-marker` said:\n\n```\n{build_log}\n```\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
