"""Label-free death calls against the death marker, on real cells, through the documented workflow.

    .venv/bin/python bench/bench_marker_truth.py [--config config/mcf7_pi.toml] [--variants documented,fitted,frozen]
        [--validate] [--write bench/results/marker_truth.md]

Data: ``../shared/data/bf_pi_mcf7`` (60 fields of HER2+ MCF7 cells attacked by immune effector
cells, 26 experiments; one multi-plane TIFF per field, planes named by a JSON sidecar; nuclei masks
``<field>_labelled.tif``). Truth: the set's PI rule, computed here on the native masks and pixels
independently of the product (a nucleus is dead when its mean PI is >= 25 background MADs above the
field's background median, background = every pixel outside every mask; live when <= 3; between
not scored).

Protocol (split by experiment, never by field or cell):

1. Experiments (the name before ``_snap``/``_roi``/``_MMStack``) sorted by name; every third
   (offset 1) is held out for the test, the rest build the references. ``--validate`` splits
   the training experiments again the same way (offset 2) and never reads the test experiments:
   the run used to choose settings. The test split is read once, for the reported figures.
2. References labelled by the marker through the product's own command, with the documented
   config's defaults: ``cellmonitor index build TRAIN --from-marker CONFIG --out INDEX``
   (the masks segmenter, label-free crops only, ambiguous cells left out; with ``fitted = true``
   the encoder is fine-tuned inside that command, settings from ``[fit]``).
3. The service replays the held-out fields (``cellmonitor replay CONFIG``) with the ``masks``
   segmenter and the per-cell sink; every figure below is read from what the service wrote
   (the per-cell Parquet files and counts.csv).
4. The direct path (the bench's own loop: read, rescale, segment, crop, embed, classify with the
   service's pipeline) gives EWC and plain 20-NN calls on the same cells; the service's calls must
   equal the direct EWC calls cell for cell.

Variants (same run, same split): ``documented`` (the config as shipped: the ``morphology``
encoder's 75 measurements, a logistic projection learned inside ``--from-marker``, EWC over it),
``fitted`` (EfficientNet-Lite0 fine-tuned on the references inside ``--from-marker``, EWC over its
PCA-whitened features: the previous documented recipe) and ``frozen`` (the frozen ImageNet encoder
of the default preset, Lite0 GeM stages 1-7 + head: the baseline). Each variant changes only the
encoder block and ``[fit] projection`` of the documented config.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import DATA, REPO, emit, need_data  # noqa: E402

SET = DATA / "bf_pi_mcf7"
CONFIG = REPO / "config" / "mcf7_pi.toml"
VARIANT_ENCODERS = {
    "fitted": '[[encoders]]\nname = "efficientnet-lite0"\noptions = { fitted = true }\n',
    "frozen": '[[encoders]]\nname = "efficientnet-lite0"\noptions = { layers = "all", pool = "gem", input_px = 128 }\n',
}


def experiment_of(stem: str) -> str:
    """The experiment a field belongs to: its name before ``_snap``, ``_roi`` or ``_MMStack``."""
    return re.split(r"_(?:snap|roi)_|_MMStack", stem)[0]


def fields() -> list[str]:
    return sorted(p.stem for p in SET.glob("*.json"))


def split(stems: list[str], offset: int) -> tuple[list[str], list[str]]:
    """(rest, held out): every third experiment by name, starting at ``offset``."""
    exps = sorted({experiment_of(s) for s in stems})
    held = {e for i, e in enumerate(exps) if i % 3 == offset}
    return [s for s in stems if experiment_of(s) not in held], [s for s in stems if experiment_of(s) in held]


def read_field(stem: str) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """(each plane by its sidecar channel name, the nuclei labels, the pixel size in um) of one field."""
    import json

    import tifffile

    names = json.loads((SET / f"{stem}.json").read_text())
    channels = names["channels"]
    stack = tifffile.imread(SET / f"{stem}.tif")
    planes = stack if stack.shape[0] == len(channels) else np.moveaxis(stack, -1, 0)
    labels = tifffile.imread(SET / f"{stem}_labelled.tif").astype(np.int64)
    return dict(zip(channels, planes, strict=True)), labels, float(names["spatial_calibration"])


def pi_mads(pi: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Each nucleus's mean PI in background MADs above the field's background median (pixels outside every mask)."""
    pi = pi.astype(np.float64)
    bg = pi[labels == 0]
    med = float(np.median(bg))
    mad = float(np.median(np.abs(bg - med))) or 1.0
    return {int(lab): float((pi[labels == lab].mean() - med) / mad) for lab in np.unique(labels[labels > 0])}


def pi_scores(stem: str) -> dict[int, float]:
    """Each nucleus's mean PI in background MADs above the field's background median (native grid)."""
    planes, labels, _ = read_field(stem)
    return pi_mads(planes["dead_nuclei_channel"], labels)


def pi_truth(stem: str) -> dict[int, str]:
    """The set's PI rule on the native grid: mask label -> "dead" | "live" (ambiguous ones left out)."""
    return {lab: ("dead" if v >= 25 else "live") for lab, v in pi_scores(stem).items() if v >= 25 or v <= 3}


def link(folder: Path, stems: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in stems:
        for suffix in (".tif", ".json", "_labelled.tif"):
            (folder / f"{s}{suffix}").symlink_to(SET / f"{s}{suffix}")


def write_config(base: Path, root: Path, watch: Path, variant: str) -> Path:
    """The documented config with only the paths changed (and, for ``fitted`` and ``frozen``, the encoder)."""
    text = base.read_text()
    text = text.replace('watch_dir = "/data/mcf7-fields"', f'watch_dir = "{watch}"')
    text = text.replace('index = "/var/lib/cellmonitor/index"', f'index = "{root / "index"}"')
    text = text.replace('state_dir = "/var/lib/cellmonitor"', f'state_dir = "{root / "state"}\"\nmetrics_port = 0')
    if variant in VARIANT_ENCODERS:
        text, n = re.subn(r'\[\[encoders\]\]\nname = "[^"]+"\n(?:options = \{[^}]*\}\n)?', VARIANT_ENCODERS[variant], text)
        text = text.replace('projection = "logistic"', 'projection = "pca-whiten"')
        assert n == 1, "the documented config has one [[encoders]] block"
    out = root / "c.toml"
    out.write_text(text)
    tomllib.loads(text)  # still valid TOML
    return out


def balanced(y_true: list[str], y_pred: list[str]) -> tuple[float, float, float]:
    """(balanced accuracy, dead recall, live recall) over the scored cells."""
    t, p = np.array(y_true), np.array(y_pred)
    dead = float((p[t == "dead"] == "dead").mean()) if (t == "dead").any() else float("nan")
    live = float((p[t == "live"] == "live").mean()) if (t == "live").any() else float("nan")
    return (dead + live) / 2, dead, live


def direct_calls(cfg_path: Path, folder: Path) -> dict[tuple[str, int], dict[str, str]]:
    """(field stem, mask label) -> {"ewc": state, "knn20": state} from the service's own pipeline, called directly."""
    from monitor.config import load_config
    from monitor.imaging import crop_cells, rescale
    from monitor.index.from_marker import frames_in
    from monitor.intake.readers import build_readers
    from monitor.pipeline import embed_cells
    from monitor.protocols import context_from
    from monitor.registry import Registry
    from monitor.service.wiring import build_pipeline, roles_for

    cfg = load_config(cfg_path)
    reg = Registry(cfg.plugins.paths)
    ctx = context_from(cfg, device="cpu")
    pipe = build_pipeline(cfg, reg, ctx)
    roles = roles_for(cfg, pipe.classifier.classes)
    index = pipe.classifier.index
    out: dict[tuple[str, int], dict[str, str]] = {}
    for frame in frames_in(cfg, build_readers(cfg, reg, ctx), folder, []):
        f = rescale(frame, pipe.pixel_size_um)
        cells = pipe.segmenter.segment(f)
        if not cells.cells:
            continue
        crops = crop_cells(f, cells, pipe.crop_px, pipe.blank_background, pipe.crop_framing, pipe.crop_margin, pipe.crop_contrast)
        emb = embed_cells(f, cells, crops, pipe.encoders, pipe.batch_size)  # a frame encoder measures each cell in its frame
        states = pipe.classifier.classify(emb)
        _, nbr = index.search(emb.vectors, 20)
        knn = [index.classes[int(np.bincount(index.labels[row[row >= 0]], minlength=len(index.classes)).argmax())] for row in nbr]
        stem = Path(frame.sources[0]).name[: -len(".tif")]
        for i, c in enumerate(cells.cells):
            out[(stem, c.id)] = {"ewc": roles[states.classes[int(states.predicted[i])]], "knn20": roles[knn[i]]}
    return out


def run_variant(variant: str, train: list[str], test: list[str], base_cfg: Path, tmp: Path) -> dict[str, Any]:
    from cellmonitor_plugins.sinks.cells import read_cells

    from monitor.cli.main import main

    root = tmp / variant
    link(root / "train", train)
    link(root / "test", test)
    cfg = write_config(base_cfg, root, root / "test", variant)
    t0 = time.perf_counter()
    assert main(["index", "build", str(root / "train"), "--from-marker", str(cfg), "--out", str(root / "index"), "--no-progress"]) == 0
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert main(["replay", str(cfg), "--no-metrics"]) == 0
    replay_s = time.perf_counter() - t0
    cells = read_cells(root / "state" / "cells")
    cells["stem"] = [Path(s).name[: -len(".tif")] for s in cells.source]
    truth = {s: pi_truth(s) for s in test}
    direct = direct_calls(cfg, root / "test")
    y_true, y_svc, y_ewc, y_knn, same, n_cmp = [], [], [], [], 0, 0
    per_field = []
    for stem, g in cells.groupby("stem"):
        t = truth[stem]
        scored = g[g.label.isin(list(t))]
        for r in scored.itertuples():
            y_true.append(t[int(r.label)])
            y_svc.append(r.state)
            d = direct.get((stem, int(r.label)))
            if d is not None:
                y_ewc.append(d["ewc"])
                y_knn.append(d["knn20"])
        for r in g.itertuples():
            d = direct.get((stem, int(r.label)))
            if d is not None:
                n_cmp += 1
                same += d["ewc"] == r.state
        if len(scored):
            per_field.append((stem, float((scored.state == "dead").mean()), float(np.mean([t[int(x)] == "dead" for x in scored.label])), len(scored)))
    with (root / "state" / "counts.csv").open(newline="") as f:
        rows = {Path(r["sources"].split(";")[0]).name[: -len(".tif")]: r for r in csv.DictReader(f)}
    control = []
    for stem, _pred, true, _n in per_field:
        r = rows.get(stem)
        if r is not None and r.get("control_area_fraction"):
            control.append((float(r["control_area_fraction"]), true))
    ba, dead, live = balanced(y_true, y_svc)
    ewc_ba = balanced(y_true, y_ewc)[0] if len(y_ewc) == len(y_true) else float("nan")
    knn_ba, knn_dead, _ = balanced(y_true, y_knn) if len(y_knn) == len(y_true) else (float("nan"),) * 3
    mae = float(np.mean([abs(p - t) for _, p, t, _ in per_field]))
    agree = [float(r["marker_agreement"]) for r in rows.values() if r.get("marker_agreement") not in (None, "")]
    n_cells = len(cells)
    return {
        "variant": variant, "train_fields": len(train), "test_fields": len(test), "test_cells": n_cells, "scored": len(y_true),
        "scored_dead": int(sum(t == "dead" for t in y_true)), "ba": ba, "dead_recall": dead, "live_recall": live,
        "direct_ewc_ba": ewc_ba, "knn20_ba": knn_ba, "knn20_dead": knn_dead, "field_mae": mae,
        "control_r": float(np.corrcoef(np.array(control).T)[0, 1]) if len(control) > 2 else float("nan"),
        "marker_agreement": float(np.mean(agree)) if agree else float("nan"),
        "service_equals_direct": f"{same}/{n_cmp}", "build_s": build_s, "replay_s": replay_s,
        "cells_per_s": n_cells / replay_s if replay_s else float("nan"),
    }


def table(results: list[dict[str, Any]], split_name: str) -> str:
    head = ("| variant | test fields / cells (scored, dead) | **BA** | dead recall | live recall | EWC direct | 20-NN BA | "
            "field dead-fraction MAE | Otsu control r | marker agreement (service) | service = direct | build s | replay cells/s |")
    lines = [f"Split: {split_name}", "", head, "|" + "---|" * 13]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['test_fields']} / {r['test_cells']} ({r['scored']}, {r['scored_dead']}) | **{r['ba']:.3f}** | "
            f"{r['dead_recall']:.3f} | {r['live_recall']:.3f} | {r['direct_ewc_ba']:.3f} | {r['knn20_ba']:.3f} | {r['field_mae']:.3f} | "
            f"{r['control_r']:.2f} | {r['marker_agreement']:.3f} | {r['service_equals_direct']} | {r['build_s']:.0f} | {r['cells_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--variants", default="documented,fitted,frozen")
    ap.add_argument("--validate", action="store_true", help="split the training experiments again; never read the test split")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    need_data()
    stems = fields()
    rest, test = split(stems, 1)
    name = "test: every third experiment by name (offset 1); references from the other experiments"
    if args.validate:
        rest, test = split(rest, 2)
        name = "validation: the training experiments split again (offset 2); the test experiments unread"
    results = []
    with tempfile.TemporaryDirectory(prefix="cellmonitor-marker-truth-") as tmp:
        for v in args.variants.split(","):
            print(f"== {v}: {len(rest)} reference fields, {len(test)} held-out fields", file=sys.stderr)
            results.append(run_variant(v, rest, test, args.config, Path(tmp)))
            print(table(results, name), file=sys.stderr)
    emit([table(results, name)], args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
