"""End to end on real counting-chamber frames: what the dashboard would show, against the boxes.

    .venv/bin/python bench/bench_e2e_livedead.py [--preset balanced] [--frames N] [--write bench/results/e2e_livedead.md]

Data: ``../shared/data/livedead`` (800 brightfield frames, ~225 x 219 px, Pascal
VOC boxes ``Living Cell`` / ``Dead Cell``; 25 frames have no box). Protocol:

1. The frames are split by frame (seed 0): 10% held out, never seen by the
   index or by the segmenter tuning (which used training frames only).
2. The reference index is built from the training frames' boxes by the
   command line itself, with its defaults: ``cellmonitor index build TRAIN
   --out INDEX --preset PRESET`` (box framing is the default for VOC frames).
3. The service's own pipeline is built from a config
   (:func:`monitor.service.loop.build_pipeline`: segmenter, encoders, index,
   the index's query side) and every held-out frame goes through
   :func:`monitor.pipeline.process_frames`, as the service's loop calls it
   (``replay`` would do the same after reading the files).
4. Per frame: counted cells vs boxes, dead fraction vs the boxes' dead fraction.

Pixel size: these frames carry none; 0.7 um/px (what a user tried) is the
config's ``pipeline.pixel_size_um`` and the frames' pixel size, so nothing is
resampled. Segmenter: the classical segmenter with :data:`LIVEDEAD_SEGMENTER`
(tuned on 120 training frames), beside its defaults (the baseline, same run).
A third row classifies the true boxes with the same index (segmentation
removed from the error: what the classifier alone gives).
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

from bench._ewc_common import DATA, need_data  # noqa: E402

PIXEL_SIZE_UM = 0.7
#: classical-segmenter options for small, sparse cells in a counting chamber at ~0.7 um/px
LIVEDEAD_SEGMENTER: dict[str, Any] = {
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


def truth(png: Path) -> tuple[list[str], list[tuple[float, float, float, float]]]:
    from monitor.index.dataset import parse_voc

    xml = png.with_suffix(".xml")
    return parse_voc(xml) if xml.is_file() else ([], [])


def build_index(train: list[Path], out: Path, preset: str, work: Path) -> float:
    """``cellmonitor index build`` on a folder of links to the training frames; returns seconds."""
    from monitor.cli.main import main

    folder = work / "train"
    folder.mkdir()
    for png in train:
        for f in (png, png.with_suffix(".xml")):
            if f.is_file():
                os.symlink(f, folder / f.name)
    t = time.perf_counter()
    rc = main(["index", "build", str(folder), "--out", str(out), "--preset", preset, "--no-progress"])
    if rc != 0:
        raise SystemExit(f"index build failed ({rc})")
    return time.perf_counter() - t


def service_pipeline(index: Path, preset: str, segmenter: dict[str, Any], state: Path, encoders: list[tuple[str, dict[str, Any]]] | None = None) -> Any:
    """The pipeline the service builds from a config naming this index, the preset's (or these) encoders and segmenter."""
    from monitor.config import parse_config
    from monitor.index.presets import PRESETS
    from monitor.protocols import BuildContext
    from monitor.registry import Registry
    from monitor.service.loop import build_pipeline

    cfg = parse_config(
        {
            "service": {"watch_dir": str(state), "state_dir": str(state)},
            "segmenter": {"name": "classical", "options": segmenter},
            "encoders": [{"name": n, "options": o} for n, o in (encoders or PRESETS[preset].encoders)],
            "classifier": {"index": str(index)},
            "pipeline": {"pixel_size_um": PIXEL_SIZE_UM, "device": "cpu"},
        }
    )
    return build_pipeline(cfg, Registry(), BuildContext(state_dir=state, device="cpu"))


def frame_of(png: Path) -> Any:
    from monitor.index.dataset import read_image
    from monitor.records import Frame, FrameKey

    return Frame(FrameKey("livedead", png.stem, "1", 0), {"image": read_image(png)}, "image", None, PIXEL_SIZE_UM, "config", "png")


def run_frames(pipeline: Any, frames: list[Path], batch: int = 8) -> tuple[list[Any], float]:
    from monitor.pipeline import process_frames

    out: list[Any] = []
    t = time.perf_counter()
    for s in range(0, len(frames), batch):
        res = process_frames([frame_of(f) for f in frames[s : s + batch]], pipeline)
        for r in res:
            if isinstance(r, Exception):
                raise r
        out += res
    return out, time.perf_counter() - t


def boxes_classified(pipeline: Any, frames: list[Path]) -> list[dict[str, int]]:
    """Per frame, the true boxes classified by the same index (no segmentation)."""
    from monitor.imaging import crop_boxes, display_range
    from monitor.pipeline import embed

    out = []
    for png in frames:
        _, boxes = truth(png)
        if not boxes:
            out.append({c: 0 for c in pipeline.classifier.classes})
            continue
        img = frame_of(png).image
        yxyx = np.array([(b[1], b[0], b[3], b[2]) for b in boxes])
        crops = crop_boxes(display_range(img), yxyx, pipeline.crop_px, pipeline.crop_margin)
        st = pipeline.classifier.classify(embed(crops, pipeline.encoders, 64))
        out.append({c: int((st.predicted == i).sum()) for i, c in enumerate(st.classes)})
    return out


def score(frames: list[Path], counted: list[dict[str, int]], dead: str) -> dict[str, float]:
    """Count error and dead-fraction error over the frames.

    * ``count_rel``: mean over frames with boxes of |counted - boxes| / boxes.
    * ``count_pooled``: sum |counted - boxes| / sum boxes (every frame).
    * ``dead_mae``: mean over frames with boxes and >= 1 counted cell of
      |dead fraction counted - dead fraction of the boxes|; ``dead_n`` frames.
    * ``dead_pooled``: |total counted dead / total counted - total true dead / total boxes|.
    """
    rel, abs_err, n_true_all, fr = [], [], 0, []
    td = tn = pd = pn = 0
    for png, c in zip(frames, counted, strict=True):
        labels, _ = truth(png)
        n_true, n = len(labels), sum(c.values())
        d_true, d = sum(lab == dead for lab in labels), c.get(dead, 0)
        abs_err.append(abs(n - n_true))
        n_true_all += n_true
        td, tn, pd, pn = td + d_true, tn + n_true, pd + d, pn + n
        if n_true:
            rel.append(abs(n - n_true) / n_true)
            if n:
                fr.append(abs(d / n - d_true / n_true))
    return {
        "count_rel": float(np.mean(rel)),
        "count_pooled": float(sum(abs_err) / max(n_true_all, 1)),
        "dead_mae": float(np.mean(fr)) if fr else float("nan"),
        "dead_n": float(len(fr)),
        "dead_pooled": abs(pd / max(pn, 1) - td / max(tn, 1)),
        "counted": float(pn),
        "boxes": float(tn),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--frames", type=int, default=0, help="held-out frames to run (0: all)")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    need_data()
    import torch

    from monitor.index.report import table

    torch.set_num_threads(2)
    folder = DATA / "livedead"
    train, test = split_frames(folder)
    if args.frames:
        test = test[: args.frames]
    dead = "Dead Cell"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        idx = work / "index"
        t_build = build_index(train, idx, args.preset, work)
        rows: list[list[object]] = []
        per_frame: list[list[object]] = []
        results = {}
        for label, seg in (("classical, defaults (baseline)", {}), ("classical, livedead options", LIVEDEAD_SEGMENTER)):
            p = service_pipeline(idx, args.preset, seg, work)
            counts, secs = run_frames(p, test)
            counted = [dict(c.counts) for c in counts]
            sc = score(test, counted, dead)
            results[label] = counted
            rows.append([label, sc["count_rel"], sc["count_pooled"], sc["dead_mae"], int(sc["dead_n"]), sc["dead_pooled"], int(sc["counted"]), int(sc["boxes"]), secs / len(test)])
        oracle = boxes_classified(p, test)
        sc = score(test, oracle, dead)
        rows.append(["true boxes, same index (no segmentation)", sc["count_rel"], sc["count_pooled"], sc["dead_mae"], int(sc["dead_n"]), sc["dead_pooled"], int(sc["counted"]), int(sc["boxes"]), float("nan")])
        for png, c in zip(test, results["classical, livedead options"], strict=True):
            labels, _ = truth(png)
            n_true, n = len(labels), sum(c.values())
            dt = sum(lab == dead for lab in labels)
            per_frame.append([png.name, n_true, n, f"{dt / n_true:.2f}" if n_true else "-", f"{c.get(dead, 0) / n:.2f}" if n else "-"])
    head = ["segmentation", "count err (mean per frame)", "count err (pooled)", "dead-fraction MAE", "frames in MAE", "dead fraction error (pooled)", "cells counted", "boxes", "s/frame"]
    text = [
        f"# End to end on held-out livedead frames (preset {args.preset})",
        "",
        f"Command: `.venv/bin/python bench/bench_e2e_livedead.py --preset {args.preset}`. {len(train)} training frames "
        f"(index built by `cellmonitor index build TRAIN --preset {args.preset}` in {t_build:.0f} s), {len(test)} held-out frames "
        f"split by frame (seed 0), pixel size {PIXEL_SIZE_UM} um/px, the service's pipeline (build_pipeline + process_frames), 2 CPU threads.",
        "",
        table(head, rows),
        "",
        "Count error per frame: mean over frames with boxes of |counted - boxes| / boxes; pooled: sum of |counted - boxes| over sum of boxes. "
        "Dead-fraction MAE over frames with boxes and at least one counted cell.",
        "",
        "Livedead segmenter options: " + ", ".join(f"{k} = {v}" for k, v in LIVEDEAD_SEGMENTER.items()),
        "",
        "## Per frame (livedead options)",
        "",
        table(["frame", "boxes", "counted", "dead fraction (boxes)", "dead fraction (counted)"], per_frame),
    ]
    out = "\n".join(text)
    print(out)
    if args.write:
        args.write.write_text(out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
