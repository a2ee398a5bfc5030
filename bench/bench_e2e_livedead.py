"""End to end on real counting-chamber frames: what the dashboard would show, against the boxes.

    .venv/bin/python bench/bench_e2e_livedead.py [--config config/livedead.toml] [--preset P] [--frames N]
        [--validate] [--write bench/results/e2e_livedead.md]

Data: ``../shared/data/livedead`` (800 brightfield frames, ~225 x 219 px, Pascal
VOC boxes ``Living Cell`` / ``Dead Cell``; 25 frames have no box). Protocol:

1. The frames are split by frame (seed 0): 10% held out, never seen by the
   index or by the segmenter tuning (which used training frames only).
   ``--validate`` is the tuning run: 144 of the 720 training frames (seed 1)
   play the held-out part and the index is built from the other 576.
2. The reference index is built from the training frames' boxes by the
   command line itself, with its defaults: ``cellmonitor index build TRAIN
   --out INDEX --preset PRESET`` (box framing is the default for VOC frames);
   the segmenter's acceptance model from the same frames by ``cellmonitor
   segment-fit TRAIN --config CONFIG --out MODEL``.
3. The service's own pipeline is built from a config
   (:func:`monitor.service.wiring.build_pipeline`: segmenter, encoders, index,
   the index's query side) and every held-out frame goes through
   :func:`monitor.pipeline.process_frames`, as the service's loop calls it
   (``replay`` would do the same after reading the files).
4. Per frame: counted cells vs boxes, dead fraction vs the boxes' dead
   fraction, and the segmented cells matched one-to-one to the boxes (a cell
   matches a box when its mask centroid lies inside the box grown by 25% on
   each side; Hungarian assignment on the normalised centre distance):
   misses (boxes without a cell) and extras (cells without a box).

Pixel size and segmenter come from the config the lab would run
(``--config``, default ``config/livedead.toml``: its ``[segmenter]`` and
``[pipeline].pixel_size_um``; these frames carry no pixel size, 0.7 um/px is
the frames' scale there, so nothing is resampled). Rows, same run: that
segmenter with an acceptance model learned from the training frames by the
command line (``cellmonitor segment-fit TRAIN --config CONFIG``: what a lab
runs beside ``index build``); that segmenter with its hand-set acceptance
rule; the classical segmenter's defaults (the baseline); the earlier
contrast-mode options (:data:`CONTRAST_OPTIONS`, the previous measurement);
the true boxes classified by the same index (segmentation removed from the
error: what the classifier alone gives).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import DATA, REPO, emit, need_data  # noqa: E402
from monitor.segmentation import match_boxes  # noqa: E402

CONFIG = REPO / "config" / "livedead.toml"
#: the earlier contrast-mode options for these frames (tuned on 120 training frames), kept as a row
CONTRAST_OPTIONS: dict[str, Any] = {
    "mode": "contrast",
    "work_pixel_size_um": 0.7,
    "background_um": 10.0,
    "contrast_um": 1.5,
    "threshold_scale": 1.5,
    "close_um": 1.0,
    "open_um": 1.0,
    "halo_snr": 0.0,
    "seed_smooth_um": 2.0,
    "seed_h_um": 3.0,
    "min_area_um2": 30.0,
    "max_area_um2": 2000.0,
}


def split_frames(folder: Path, test_fraction: float = 0.1, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """(train, test) PNG frames, split by frame with a fixed seed."""
    frames = sorted(folder.glob("*.png"))
    perm = np.random.default_rng(seed).permutation(len(frames))
    n_test = round(test_fraction * len(frames))
    test = set(perm[:n_test].tolist())
    return [f for i, f in enumerate(frames) if i not in test], [f for i, f in enumerate(frames) if i in test]


def validation_split(train: list[Path], n_val: int = 144, seed: int = 1) -> tuple[list[Path], list[Path]]:
    """(fit, validation) frames out of the training frames: the tuning split (the test frames stay unseen)."""
    perm = np.random.default_rng(seed).permutation(len(train))
    val = set(perm[:n_val].tolist())
    return [f for i, f in enumerate(train) if i not in val], [f for i, f in enumerate(train) if i in val]


def read_lab_config(path: Path) -> tuple[float, dict[str, Any]]:
    """(pixel size in um, classical-segmenter options) of a lab config; the options are validated here.

    The options leave out ``acceptance`` (a model file the lab fits from its
    own boxed frames): the benches fit theirs on their training frames or
    measure the hand-set rule.
    """
    import tomllib

    from cellmonitor_plugins.segmenters.classical import Options

    cfg = tomllib.loads(path.read_text())
    seg = cfg.get("segmenter", {})
    if seg.get("name", "classical") != "classical":
        raise SystemExit(f"{path}: segmenter.name: this bench runs the classical segmenter (got {seg.get('name')!r})")
    options = dict(seg.get("options", {}))
    options.pop("acceptance", None)
    Options(**options)
    return float(cfg.get("pipeline", {}).get("pixel_size_um", 0.322)), options


def truth(png: Path) -> tuple[list[str], list[tuple[float, float, float, float]]]:
    from monitor.index.dataset import parse_voc

    xml = png.with_suffix(".xml")
    return parse_voc(xml) if xml.is_file() else ([], [])


def build_index(train: list[Path], out: Path, preset: str | None, work: Path) -> float:
    """``cellmonitor index build`` on a folder of links to the training frames (its defaults but ``--preset``); returns seconds."""
    from monitor.cli.main import main

    folder = work / "train"
    folder.mkdir()
    for png in train:
        for f in (png, png.with_suffix(".xml")):
            if f.is_file():
                os.symlink(f, folder / f.name)
    t = time.perf_counter()
    rc = main(["index", "build", str(folder), "--out", str(out), *(["--preset", preset] if preset else []), "--no-progress"])
    if rc != 0:
        raise SystemExit(f"index build failed ({rc})")
    return time.perf_counter() - t


def fit_acceptance(work: Path, config: Path, out: Path) -> float:
    """``cellmonitor segment-fit TRAIN --config CONFIG --out MODEL`` on the training frames' folder (made by :func:`build_index`); seconds."""
    from monitor.cli.main import main

    t = time.perf_counter()
    rc = main(["segment-fit", str(work / "train"), "--config", str(config), "--out", str(out), "--no-progress"])
    if rc != 0:
        raise SystemExit(f"segment-fit failed ({rc})")
    return time.perf_counter() - t


def service_pipeline(index: Path, preset: str, segmenter: dict[str, Any], state: Path, pixel_size_um: float,
                     encoders: list[tuple[str, dict[str, Any]]] | None = None) -> Any:
    """The pipeline the service builds from a config naming this index, the preset's (or these) encoders and this segmenter."""
    from monitor.config import parse_config
    from monitor.index.presets import PRESETS
    from monitor.protocols import BuildContext
    from monitor.registry import Registry
    from monitor.service.wiring import build_pipeline

    cfg = parse_config(
        {
            "service": {"watch_dir": str(state), "state_dir": str(state)},
            "segmenter": {"name": "classical", "options": segmenter},
            "encoders": [{"name": n, "options": o} for n, o in (encoders or PRESETS[preset].encoders)],
            "classifier": {"index": str(index)},
            "pipeline": {"pixel_size_um": pixel_size_um, "device": "cpu"},
        }
    )
    return build_pipeline(cfg, Registry(), BuildContext(state_dir=state, device="cpu"))


def frame_of(png: Path, pixel_size_um: float) -> Any:
    from monitor.index.dataset import read_image
    from monitor.records import Frame, FrameKey

    return Frame(FrameKey("livedead", png.stem, "1", 0), {"image": read_image(png)}, "image", None, pixel_size_um, "config", "png")


def run_frames(pipeline: Any, frames: list[Path], pixel_size_um: float, batch: int = 8) -> tuple[list[Any], float]:
    from monitor.pipeline import process_frames

    out: list[Any] = []
    t = time.perf_counter()
    for s in range(0, len(frames), batch):
        res = process_frames([frame_of(f, pixel_size_um) for f in frames[s : s + batch]], pipeline)
        for r in res:
            if isinstance(r, Exception):
                raise r
        out += res
    return out, time.perf_counter() - t


def misses_extras(segmenter: Any, frames: list[Path], pixel_size_um: float) -> list[tuple[int, int]]:
    """Per frame (boxes without a cell, cells without a box) for the pipeline's segmenter on the frame's grid."""
    out = []
    for png in frames:
        _, boxes = truth(png)
        cells = segmenter.segment(frame_of(png, pixel_size_um)).cells
        cent = np.array([c.centroid_yx_px for c in cells], dtype=np.float64).reshape(-1, 2)
        m = len(match_boxes(cent, np.array(boxes, dtype=np.float64).reshape(-1, 4)))
        out.append((len(boxes) - m, len(cells) - m))
    return out


def boxes_classified(pipeline: Any, frames: list[Path], pixel_size_um: float) -> list[dict[str, int]]:
    """Per frame, the true boxes classified by the same index (no segmentation)."""
    from monitor.imaging import crop_boxes, display_range
    from monitor.pipeline import embed

    out = []
    for png in frames:
        _, boxes = truth(png)
        if not boxes:
            out.append({c: 0 for c in pipeline.classifier.classes})
            continue
        img = frame_of(png, pixel_size_um).image
        yxyx = np.array([(b[1], b[0], b[3], b[2]) for b in boxes])
        crops = crop_boxes(display_range(img), yxyx, pipeline.crop_px, pipeline.crop_margin)
        st = pipeline.classifier.classify(embed(crops, pipeline.encoders, 64))
        out.append({c: int((st.predicted == i).sum()) for i, c in enumerate(st.classes)})
    return out


def score(frames: list[Path], counted: list[dict[str, int]], dead: str) -> dict[str, float]:
    """Count error and dead-fraction error over the frames.

    * ``count_rel``: the target's "mean per-frame cell-count error": mean over
      frames with boxes of |counted - boxes| / boxes (a relative error has no
      meaning on a frame with no box; those are reported as ``empty_extra``).
    * ``count_mae``: mean over every frame of |counted - boxes|, in cells.
    * ``count_pooled``: sum |counted - boxes| / sum boxes (every frame).
    * ``empty_extra``: cells counted on the frames with no box.
    * ``dead_mae``: mean over frames with boxes and >= 1 counted cell of
      |dead fraction counted - dead fraction of the boxes|; ``dead_n`` frames.
    * ``dead_pooled``: |total counted dead / total counted - total true dead / total boxes|.
    """
    rel, abs_err, fr = [], [], []
    td = tn = pd = pn = empty_extra = 0
    for png, c in zip(frames, counted, strict=True):
        labels, _ = truth(png)
        n_true, n = len(labels), sum(c.values())
        d_true, d = sum(lab == dead for lab in labels), c.get(dead, 0)
        abs_err.append(abs(n - n_true))
        td, tn, pd, pn = td + d_true, tn + n_true, pd + d, pn + n
        if n_true:
            rel.append(abs(n - n_true) / n_true)
            if n:
                fr.append(abs(d / n - d_true / n_true))
        else:
            empty_extra += n
    return {
        "count_rel": float(np.mean(rel)),
        "count_mae": float(np.mean(abs_err)),
        "count_pooled": float(sum(abs_err) / max(tn, 1)),
        "empty_extra": float(empty_extra),
        "dead_mae": float(np.mean(fr)) if fr else float("nan"),
        "dead_n": float(len(fr)),
        "dead_pooled": abs(pd / max(pn, 1) - td / max(tn, 1)),
        "counted": float(pn),
        "boxes": float(tn),
    }


def main() -> int:
    from monitor.index.presets import DEFAULT_PRESET

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=CONFIG, help="lab config whose [segmenter] and pixel size are measured")
    ap.add_argument("--preset", default=None, help=f"index build preset (default: the command line's, {DEFAULT_PRESET})")
    ap.add_argument("--frames", type=int, default=0, help="held-out frames to run (0: all)")
    ap.add_argument("--validate", action="store_true", help="tuning run: a validation split of the training frames, never the test frames")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    need_data()
    import torch

    from monitor.report.classification import table

    torch.set_num_threads(2)
    preset = args.preset or DEFAULT_PRESET
    um, lab_options = read_lab_config(args.config)
    folder = DATA / "livedead"
    train, test = split_frames(folder)
    if args.validate:
        train, test = validation_split(train)
    if args.frames:
        test = test[: args.frames]
    dead = "Dead Cell"
    cfg_name = args.config.name
    setups = (
        (f"classical, {cfg_name} + segment-fit acceptance", lab_options),
        (f"classical, {cfg_name}, hand-set rule (mode {lab_options.get('mode', 'auto')})", lab_options),
        ("classical, defaults (baseline)", {}),
        ("classical, earlier contrast options", CONTRAST_OPTIONS),
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        idx = work / "index"
        t_build = build_index(train, idx, args.preset, work)
        model = work / "acceptance.json"
        t_fit = fit_acceptance(work, args.config, model)
        rows: list[list[object]] = []
        per_frame: list[list[object]] = []
        first: tuple[list[dict[str, int]], list[tuple[int, int]]] | None = None
        for i, (label, seg) in enumerate(setups):
            p = service_pipeline(idx, preset, {**seg, "acceptance": str(model)} if i == 0 else seg, work, um)
            counts, secs = run_frames(p, test, um)
            counted = [dict(c.counts) for c in counts]
            me = misses_extras(p.segmenter, test, um)
            first = first or (counted, me)
            sc = score(test, counted, dead)
            rows.append([label, sc["count_rel"], sc["count_mae"], sc["count_pooled"], int(sc["empty_extra"]), sc["dead_mae"], int(sc["dead_n"]),
                         sc["dead_pooled"], int(sc["counted"]), int(sc["boxes"]), sum(m for m, _ in me), sum(e for _, e in me), secs / len(test)])
        oracle = boxes_classified(p, test, um)
        sc = score(test, oracle, dead)
        rows.append(["true boxes, same index (no segmentation)", sc["count_rel"], sc["count_mae"], sc["count_pooled"], int(sc["empty_extra"]), sc["dead_mae"],
                     int(sc["dead_n"]), sc["dead_pooled"], int(sc["counted"]), int(sc["boxes"]), 0, 0, float("nan")])
        assert first is not None
        for png, c, (miss, extra) in zip(test, *first, strict=True):
            labels, _ = truth(png)
            n_true, n = len(labels), sum(c.values())
            dt = sum(lab == dead for lab in labels)
            per_frame.append([png.name, n_true, n, miss, extra, f"{dt / n_true:.2f}" if n_true else "-", f"{c.get(dead, 0) / n:.2f}" if n else "-"])
    head = ["segmentation", "count err (mean per frame)", "count MAE (cells)", "count err (pooled)", "cells on empty frames", "dead-fraction MAE",
            "frames in MAE", "dead fraction error (pooled)", "cells counted", "boxes", "missed boxes", "extra cells", "s/frame"]
    which = "validation frames (a split of the training frames; tuning run)" if args.validate else "held-out frames"
    cmd = " ".join(["bench/bench_e2e_livedead.py", *sys.argv[1:]])
    text = [
        f"# End to end on {which} of livedead (preset {preset})",
        "",
        f"Command: `.venv/bin/python {cmd}`. {len(train)} index frames "
        f"(index built by `cellmonitor index build TRAIN{' --preset ' + args.preset if args.preset else ''}` in {t_build:.0f} s; "
        f"acceptance model by `cellmonitor segment-fit TRAIN --config {cfg_name}` in {t_fit:.0f} s), {len(test)} {which}, "
        f"split by frame (seed 0{', validation seed 1' if args.validate else ''}), pixel size {um} um/px and segmenter from `{args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}`, "
        "the service's pipeline (build_pipeline + process_frames), 2 CPU threads.",
        "",
        table(head, rows),
        "",
        "Count error per frame: mean over frames with boxes of |counted - boxes| / boxes (cells counted on frames with no box are in their own column); "
        "count MAE: mean over every frame of |counted - boxes|; pooled: sum of |counted - boxes| over sum of boxes. "
        "Dead-fraction MAE over frames with boxes and at least one counted cell. Missed boxes / extra cells: segmented cells matched "
        "one-to-one to the boxes (mask centroid inside the box grown by 25% each side; Hungarian on centre distance).",
        "",
        f"Segmenter options ({cfg_name}): " + ", ".join(f"{k} = {v}" for k, v in lab_options.items()),
        "",
        f"## Per frame ({setups[0][0]})",
        "",
        table(["frame", "boxes", "counted", "missed boxes", "extra cells", "dead fraction (boxes)", "dead fraction (counted)"], per_frame),
    ]
    emit(text, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
