"""Each index preset's accuracy and speed, measured through the command line's own defaults.

    .venv/bin/python bench/bench_presets.py [--presets raw,fast,accurate] [--skip-speed] [--write bench/results/presets.md]

Accuracy (each row: ``cellmonitor index build TRAIN --out INDEX --preset P`` then
``cellmonitor index evaluate INDEX TEST --json``, nothing else on the command line):

* pbc: 2,400 white-blood-cell images, 8 classes, split 90/10 stratified (seed 0):
  the index never sees the test cells;
* livedead: boxed frames split 90/10 by frame (seed 0), cells of one frame never
  on both sides;
* transfer: index on all of pbc, evaluated on bccd (5 shared classes; a
  prediction outside them counts as wrong).

EWC and plain 20-NN are on the same (conditioned) features in the same run:
``raw`` (the paper's setting: Lite0 last layer, raw vectors) is the baseline.

Speed: cells per second end to end (segment, crop, embed, classify:
:func:`monitor.pipeline.process_frames` on the service's pipeline) on a
Lionheart-size frame (1224 x 904 px) tiled from real livedead frames at 0.7
um/px, with torch limited to 2 threads (the 2-core target machine).
Embeddings come from the cache (``~/.cache/cellmonitor/embeddings``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import DATA, emit, need_data  # noqa: E402
from bench.bench_e2e_livedead import CONFIG as LIVEDEAD_CONFIG  # noqa: E402
from bench.bench_e2e_livedead import read_lab_config, service_pipeline, split_frames  # noqa: E402

PIXEL_SIZE_UM, LIVEDEAD_SEGMENTER = read_lab_config(LIVEDEAD_CONFIG)

LIONHEART_YX = (904, 1224)
SPEED_HEAD = ["preset", "encoders", "cells", "s/frame", "cells/s", "segment s", "embed s", "classify s", "load avg"]


def link_folders(files: list[Path], root: Path, out: Path) -> Path:
    """A folder of links to ``files`` keeping their path below ``root`` (class folders)."""
    for f in files:
        dst = out / f.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, dst)
    return out


def pbc_split(seed: int = 0) -> tuple[list[Path], list[Path]]:
    from monitor.index.dataset import scan, stratified_split

    ds = scan(DATA / "pbc")
    labels = np.array([ds.classes.index(f.labels[0]) for f in ds.files])
    tr, te = stratified_split(labels, 0.1, seed)
    return [ds.files[i].path for i in tr], [ds.files[i].path for i in te]


def standard_sets(work: Path) -> tuple[Path, Path, Path, Path, list[Path], list[Path]]:
    """The benches' splits as folders of links under ``work``: pbc train/test (90/10 stratified),
    livedead boxed train/test frames (90/10 by frame), and the livedead train/test frame lists."""
    ptr, pte = pbc_split()
    pbc_train = link_folders(ptr, DATA / "pbc", work / "pbc-train")
    pbc_test = link_folders(pte, DATA / "pbc", work / "pbc-test")
    ld_train, ld_test = split_frames(DATA / "livedead")
    boxed = [f for f in ld_train if f.with_suffix(".xml").is_file()]
    ldt = link_folders([*boxed, *(f.with_suffix(".xml") for f in boxed)], DATA / "livedead", work / "ld-train")
    boxed_test = [f for f in ld_test if f.with_suffix(".xml").is_file()]
    lde = link_folders([*boxed_test, *(f.with_suffix(".xml") for f in boxed_test)], DATA / "livedead", work / "ld-test")
    return pbc_train, pbc_test, ldt, lde, ld_train, ld_test


def cli(*argv: str) -> str:
    """Run ``cellmonitor ARGV``; its stdout."""
    import contextlib
    import io

    from monitor.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"cellmonitor {' '.join(argv)}: exit {rc}")
    return buf.getvalue()


def _px128(preset: str) -> list[str]:
    """The preset's encoders at a 128 px input (a quarter of the pixels of 224: faster on a weak CPU)."""
    from monitor.index.presets import PRESETS, encoder_spec

    return [encoder_spec(n, {**o, "input_px": 128}) for n, o in PRESETS[preset].encoders]


def build_and_evaluate(train: Path, test: Path, preset: str, work: Path) -> tuple[dict[str, Any], Path]:
    """``PRESET``, ``PRESET/raw`` (the same preset with ``--condition-dim 0``: its unconditioned
    baseline) or ``PRESET/tta`` (with ``--tta 8``: query-side test-time augmentation)."""
    name, _, variant = preset.partition("/")
    idx = work / f"index-{name}-{variant}-{train.name}"
    extra = {"raw": ["--condition-dim", "0"], "tta": ["--tta", "8"], "px128": ["--encoders", ",".join(_px128(name))]}.get(variant, [])
    cli("index", "build", str(train), "--out", str(idx), "--preset", name, "--no-progress", *extra)
    return json.loads(cli("index", "evaluate", str(idx), str(test), "--json", "--no-progress")), idx


def lionheart_frame(frames: list[Path]) -> np.ndarray:
    """A 904 x 1224 grey frame tiled from real livedead frames (each stretched to its own 8-bit range)."""
    from monitor.imaging import display_range
    from monitor.index.dataset import read_image

    h, w = LIONHEART_YX
    out = np.zeros((h, w), np.uint8)
    tiles = iter(frames)
    for y in range(0, h, 218):
        for x in range(0, w, 218):
            t = display_range(read_image(next(tiles)))[..., 0][:218, :218]
            out[y : y + 218, x : x + 218] = t[: h - y, : w - x]
    return out


def speed(index: Path, preset: str, frames: list[Path], work: Path, repeats: int = 3) -> tuple[int, float, dict[str, float]]:
    """(cells in the frame, best-of-``repeats`` seconds end to end, that run's stage seconds) on one Lionheart-size frame."""
    from dataclasses import replace

    from monitor.index.presets import parse_encoder
    from monitor.pipeline import process_frames
    from monitor.records import Frame, FrameKey

    # every cell framed by its box, as an index built from boxed frames asks
    name, _, variant = preset.partition("/")
    encs = [parse_encoder(e) for e in _px128(name)] if variant == "px128" else None
    p = replace(service_pipeline(index, name, LIVEDEAD_SEGMENTER, work, PIXEL_SIZE_UM, encs), crop_framing="box")
    frame = Frame(FrameKey("speed", "A1", "1", 0), {"image": lionheart_frame(frames)}, "image", None, PIXEL_SIZE_UM, "config", "bench")
    best, n, stages = float("inf"), 0, {}
    process_frames([frame], p)  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        (c,) = process_frames([frame], p)
        dt = time.perf_counter() - t
        if dt < best:
            best, n, stages = dt, c.n_cells, dict(c.stage_seconds)  # type: ignore[union-attr]
    return n, best, stages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="raw,fast,accurate")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: pbc,livedead,transfer")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    need_data()
    import torch

    from monitor.index.presets import PRESETS
    from monitor.report.classification import table

    torch.set_num_threads(2)
    skip = set(args.skip.split(",")) - {""}
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    acc_rows: list[list[object]] = []
    speed_rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pbc_train, pbc_test, ldt, lde, ld_train, ld_test = standard_sets(work)
        for preset in presets:
            desc = PRESETS[preset.partition("/")[0]].description + {"raw": ", raw vectors", "tta": ", query TTA 8", "px128": ", 128 px encoder input"}.get(preset.partition("/")[2], "")
            sets = [("pbc 90/10", pbc_train, pbc_test), ("livedead by frame", ldt, lde), ("transfer pbc -> bccd", DATA / "pbc", DATA / "bccd")]
            ld_index = pbc_index = None
            for name, tr, te in sets:
                key = {"pbc 90/10": "pbc", "livedead by frame": "livedead", "transfer pbc -> bccd": "transfer"}[name]
                if key in skip:
                    continue
                t = time.perf_counter()
                rep, idx = build_and_evaluate(tr, te, preset, work)
                if key == "livedead":
                    ld_index = idx
                if key == "pbc":
                    pbc_index = idx
                e, b = rep["ewc"], rep["baseline"]
                acc_rows.append([preset, name, b["macro_accuracy"], e["macro_accuracy"], e["macro_accuracy"] - b["macro_accuracy"], e["mean_k"], e["n"], time.perf_counter() - t])
                print(table(["preset", "data", "plain 20-NN", "EWC", "EWC - kNN", "mean k", "test cells", "s"], acc_rows[-1:]), flush=True)
            if not args.skip_speed and (preset.endswith("/px128") or "/" not in preset):
                if ld_index is None and pbc_index is None:  # any index with the preset's encoders will do
                    pbc_index = work / f"speed-{preset}"
                    name, _, variant = preset.partition("/")
                    extra = ["--encoders", ",".join(_px128(name))] if variant == "px128" else []
                    cli("index", "build", str(pbc_train), "--out", str(pbc_index), "--preset", name, "--no-progress", *extra)
                n, secs, st = speed(ld_index or pbc_index, preset, ld_test + ld_train, work)  # type: ignore[arg-type]
                load = os.getloadavg()[0]
                speed_rows.append([preset, desc, n, secs, n / secs, st.get("segment", float("nan")), st.get("embed", float("nan")), st.get("classify", float("nan")), load])
                print(table(SPEED_HEAD, speed_rows[-1:]), flush=True)
    text = [
        "# Index presets: accuracy and speed",
        "",
        f"Command: `.venv/bin/python bench/bench_presets.py --presets {args.presets}`"
        + (" --skip-speed" if args.skip_speed else "")
        + (f" --skip {args.skip}" if args.skip else "")
        + ". Every index built by `cellmonitor index build TRAIN --out INDEX --preset P` and scored by "
        "`cellmonitor index evaluate INDEX TEST --json` (command-line defaults otherwise); plain 20-NN and EWC on the "
        "same features in the same run; `raw` is the paper's setting (the baseline).",
        "",
        "| preset | what |",
        "|---|---|",
        *[f"| {p} | {PRESETS[p].description}; query TTA {PRESETS[p].tta}; EWC k {PRESETS[p].ewc.k_min}..{PRESETS[p].ewc.k_max} thr {PRESETS[p].ewc.entropy_threshold:g} |" for p in presets if p in PRESETS],
        *[f"| {p} | the same preset with `--condition-dim 0`: raw vectors (the conditioning's baseline) |" for p in presets if p.endswith("/raw")],
        *[f"| {p} | the same preset with `--tta 8`: each query cell embedded as the mean of its 8 flips/rotations |" for p in presets if p.endswith("/tta")],
        *[f"| {p} | the same preset with the encoders at a 128 px input (`--encoders {','.join(_px128(p.partition('/')[0]))}`) |" for p in presets if p.endswith("/px128")],
        "",
        "## Accuracy (macro = balanced accuracy)",
        "",
        table(["preset", "data", "plain 20-NN", "EWC", "EWC - kNN", "mean k", "test cells", "s"], acc_rows),
    ]
    if speed_rows:
        text += [
            "",
            "## Speed: one 1224 x 904 frame (tiled real livedead frames, 0.7 um/px), end to end, torch 2 threads, best of 3",
            "",
            table(SPEED_HEAD, speed_rows),
            "",
            "The machine is shared: the load average (1 min) at the end of each measurement is in the last column; "
            "with a load above 2 on 2 cores the times are inflated by other jobs.",
        ]
    emit(text, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
