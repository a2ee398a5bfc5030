"""A whole plate through the running service: does a 2-core lab PC keep up with an hourly 96-well plate?

    .venv/bin/python bench/bench_plate.py [--frames 384] [--cells 200] [--arrival-s 0] [--write bench/results/plate.md]

One timepoint of a 96-well plate imaged at 4 fields a well (384 frames; more frames are the next
timepoints of the same plate, so 768 is two hourly plates with tracks linking them; brightfield-like
phase + an Apo-15 channel, 1224 x 904 px at 0.322 um/px, about 200 cells each: the demo's
synthetic cells, rendered on 16 distinct fields reused under the plate's well and field
names) lands in the watched folder of the real service (watcher, stability check, ledger,
channel assembly, counts CSV, metrics), which runs the default preset's encoder
(``balanced``: EfficientNet-Lite0, GeM-pooled stages 1-7 + head, conditioned to 128-d) over
an index of the demo's synthetic references, with the command-line defaults otherwise
(``runtime = "auto"``: the CPU runtime when the ``[cpu]`` extra is installed).

``--arrival-s 0`` (the default) lands the whole plate at once, the hardest case: the backlog
is the plate. Measured: the time until the last frame is counted (target: 40 minutes, a 1.5x
margin on an hourly plate), each frame's latency from landing to its CSV row (p50, p95), the
backlog and the process's resident memory every minute.

``--soak`` is the long run (issue 23, "RSS flat"): a smaller plate (``--wells``) lands one
timepoint at a time, each once the previous one is counted (as an hourly plate does), for as many
timepoints as ``--frames`` holds; the resident memory after every frame gives the verdict: the
first ``--warmup`` of the frames are the warm-up, and after it the growth from its first to its
last frame (target: below +10%) and the slope over the second half (MB per 100 frames, least
squares), with what that slope would add over a day of hourly 96-well plates (9,216 frames).

Baseline in the same run: the same service with the encoder on torch (``runtime = "torch"``)
over the first ``--baseline-frames`` frames (default 16), its cells/s and the plate time it
projects.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import emit  # noqa: E402

SHAPE = (904, 1224)
PX_UM = 0.322
WELLS = [f"{r}{c}" for r in "ABCDEFGH" for c in range(1, 13)]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


#: ``[tracking] memory_timepoints`` of the service's config (None: the default); ``--memory-timepoints``
MEMORY_TIMEPOINTS: int | None = None


def config_text(root: Path, runtime: str) -> str:
    from monitor.demo.run import DEMO_CONFIG
    from monitor.index.presets import PRESETS

    enc = "\n".join(f'[[encoders]]\nname = "{n}"\noptions = {{ {", ".join(f"{k} = {_toml(v)}" for k, v in {**o, "runtime": runtime}.items())} }}\n'
                    for n, o in PRESETS["balanced"].encoders)
    text = DEMO_CONFIG.replace('[[encoders]]\nname = "efficientnet-lite0"\n', enc)
    if MEMORY_TIMEPOINTS is not None:
        text = text.replace("[tracking]\n", f"[tracking]\nmemory_timepoints = {MEMORY_TIMEPOINTS}\n", 1)
    text = text.replace("metrics_port = 9108", "metrics_port = 0").replace("pixel_size_um = 0.322", f"pixel_size_um = {PX_UM}")
    return text.replace('watch_dir = "input"', f'watch_dir = "{root / "input"}"').replace(
        'state_dir = "state"', f'state_dir = "{root / "state"}"').replace('index = "index"', f'index = "{root.parent / "index"}"')


def _toml(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def build_index(root: Path) -> int:
    """The demo's synthetic references through the balanced preset's encoder, conditioned as the preset is."""
    from monitor.config import load_config
    from monitor.demo.run import STATES, bootstrap_pipeline, reference_vectors
    from monitor.index.presets import PRESETS
    from monitor.index.store import ReferenceIndex
    from monitor.protocols import context_from
    from monitor.registry import Registry

    (root / "refs").mkdir(parents=True)
    cfg_path = root / "refs" / "refs.toml"
    cfg_path.write_text(config_text(root / "refs", "auto"))
    cfg = load_config(cfg_path)
    boot = bootstrap_pipeline(cfg, Registry(), context_from(cfg, device="cpu"))
    vectors, labels = reference_vectors(boot, 30, 7, lambda s: None)
    pre = PRESETS["balanced"]
    ix = ReferenceIndex.build(vectors, labels, STATES,
                              [{"name": e.name, "id": e.id, "dim": e.dim} for e in boot.encoders], conditioning=pre.conditioning,
                              ewc=pre.ewc)
    ix.save(root / "index")
    return len(ix)


def fields(n: int, cells: int, seed: int = 11) -> list[tuple[np.ndarray, np.ndarray]]:
    from monitor.demo.synthetic import make_cells, render_field

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cs = make_cells(cells, SHAPE[1] * PX_UM, rng, onset_scale=4.0, n_timepoints=8, radius_um=7.0)
        cs = [replace(c, y_um=c.y_um * SHAPE[0] / SHAPE[1]) for c in cs]  # make_cells fills a square: squeeze it into the frame
        phase, fluo, _ = render_field(cs, 3.0, SHAPE, PX_UM, seed * 100 + i)
        out.append((phase, fluo))
    return out


def write(folder: Path, well: str, field: int, phase: np.ndarray, fluo: np.ndarray, timepoint: int = 1) -> None:
    import tifffile

    res = (1e4 / PX_UM, 1e4 / PX_UM)
    for name, img in (("phase", phase), ("apo15", fluo)):
        tmp = folder / f".demo_{well}_f{field}_t{timepoint:03d}_{name}.tif.part"
        tifffile.imwrite(tmp, img, resolution=res, resolutionunit="CENTIMETER", compression="zlib")
        tmp.replace(folder / f"demo_{well}_f{field}_t{timepoint:03d}_{name}.tif")  # lands whole, as a microscope's rename does


def run_plate(root: Path, runtime: str, n_frames: int, pool: list[tuple[np.ndarray, np.ndarray]], arrival_s: float,
              timeout_s: float, say: Any, wells: int = len(WELLS), soak: bool = False) -> dict[str, Any]:
    from monitor.config import load_config
    from monitor.registry import Registry
    from monitor.service.wiring import build_service, stop_server

    root.mkdir(parents=True)
    (root / "input").mkdir()
    cfg_path = root / "plate.toml"
    cfg_path.write_text(config_text(root, runtime))
    cfg = load_config(cfg_path)
    service, server = build_service(cfg, Registry(), serve_metrics=False)
    done: dict[tuple[str, str, int], float] = {}
    cells: list[int] = []
    cv = threading.Condition()

    per_frame: list[float] = []  # RSS after each frame, MB

    def on_counts(c: Any) -> None:
        with cv:
            done[(c.key.well, c.key.field, c.key.timepoint)] = time.monotonic()
            cells.append(c.n_cells)
            per_frame.append(rss_mb())
            cv.notify_all()

    service.on_counts = on_counts
    stop = threading.Event()
    worker = threading.Thread(target=service.run, args=(stop,), daemon=True)
    worker.start()
    landed: dict[tuple[str, str, int], float] = {}
    # one plate (96 wells x 4 fields) per timepoint: frames beyond a plate are the next timepoint
    keys = [(WELLS[i // 4 % wells], str(i % 4 + 1), i // (4 * wells) + 1) for i in range(n_frames)]
    t0 = time.monotonic()
    samples: list[tuple[float, int, float]] = []
    next_sample = t0
    try:
        for i, (w, f, tp) in enumerate(keys):
            phase, fluo = pool[i % len(pool)]
            write(root / "input", w, int(f), phase, fluo, tp)
            landed[(w, f, tp)] = time.monotonic()
            if arrival_s:
                time.sleep(arrival_s)
            if soak and (i + 1 == len(keys) or keys[i + 1][2] != tp):  # the next timepoint lands once this one is counted
                with cv:
                    while len(done) < i + 1 and time.monotonic() - t0 < timeout_s:
                        cv.wait(1.0)
                say(f"  {runtime}: timepoint {tp}: {len(done)}/{n_frames} frames at {time.monotonic() - t0:.0f} s, RSS {rss_mb():.0f} MB")
        with cv:
            while len(done) < n_frames and time.monotonic() - t0 < timeout_s:
                if time.monotonic() >= next_sample:
                    samples.append((time.monotonic() - t0, n_frames - len(done), rss_mb()))
                    say(f"  {runtime}: {len(done)}/{n_frames} frames at {time.monotonic() - t0:.0f} s, RSS {rss_mb():.0f} MB")
                    next_sample += 60
                cv.wait(1.0)
        total = max(done.values()) - t0 if done else float("nan")
        samples.append((time.monotonic() - t0, n_frames - len(done), rss_mb()))
    finally:
        stop.set()
        worker.join(60)
        service.close()
        stop_server(server)
    lat = np.array([done[k] - landed[k] for k in done])
    return {"runtime": service.pipeline.encoders[0].runtime, "frames": len(done), "of": n_frames, "seconds": total,
            "cells": int(sum(cells)), "cells_per_s": sum(cells) / total if done else float("nan"),
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p95": float(np.percentile(lat, 95)) if len(lat) else float("nan"), "samples": samples, "per_frame": per_frame}


#: a day of hourly 96-well plates at 4 fields a well
DAY_FRAMES = 24 * 384


def rss_verdict(per_frame: list[float], warmup: float, target_pct: float = 10.0) -> dict[str, Any]:
    """Growth of the resident memory after the warm-up (the first ``warmup`` share of the frames).

    RSS read after a frame swings by 100 MB and more with what that frame left allocated (two levels
    that alternate), so single readings are compared by their upper envelope: the peak of the first
    quarter of the frames after the warm-up against the peak of the last quarter (PASS below
    ``target_pct``), and the slope between those two peaks in MB per 100 frames, with what it adds
    over :data:`DAY_FRAMES`."""
    rss = np.asarray(per_frame, dtype=float)
    w = min(len(rss) - 2, int(len(rss) * warmup)) if len(rss) > 2 else 0
    after = rss[w:]
    q = max(1, len(after) // 4)
    first, last = after[:q], after[-q:]
    start, end = float(first.max()), float(last.max())
    span = (len(after) - q) if len(after) > q else 1
    slope = (end - start) / span * 100
    growth = (end - start) / start * 100
    return {"warmup_frames": w, "start": start, "end": end, "peak": float(after.max()), "growth_pct": growth,
            "slope_mb_per_100": slope, "day_mb": slope * DAY_FRAMES / 100, "pass": growth < target_pct}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=384)
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--arrival-s", type=float, default=0.0, help="seconds between frames landing (0: the whole plate at once)")
    ap.add_argument("--baseline-frames", type=int, default=16, help="frames run on torch first, as the baseline (0: none)")
    ap.add_argument("--timeout-min", type=float, default=90)
    ap.add_argument("--wells", type=int, default=len(WELLS), help="wells of the plate (4 fields each): a smaller plate has more timepoints in --frames")
    ap.add_argument("--soak", action="store_true", help="land one timepoint at a time, each once the previous one is counted, and give the RSS verdict")
    ap.add_argument("--warmup", type=float, default=0.25, help="share of the frames counted as the warm-up of the RSS verdict (--soak)")
    ap.add_argument("--memory-timepoints", type=int, default=None,
                    help="[tracking] memory_timepoints of the service (default: the config's default)")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    global MEMORY_TIMEPOINTS
    MEMORY_TIMEPOINTS = args.memory_timepoints
    from monitor.report.classification import table

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("CELLMONITOR_RUNTIME_CACHE", str(root / "runtime-cache"))
        n_refs = build_index(root)
        say(f"index: {n_refs} synthetic references; rendering 16 fields of {args.cells} cells")
        pool = fields(16, args.cells)
        runs = []
        if args.baseline_frames:
            runs.append(("torch (baseline)", run_plate(root / "torch", "torch", args.baseline_frames, pool, args.arrival_s,
                                                       args.timeout_min * 60, say)))
        runs.append(("default (auto)", run_plate(root / "auto", "auto", args.frames, pool, args.arrival_s, args.timeout_min * 60, say,
                                                 args.wells, args.soak)))
    head = ["service", "encoder runtime", "frames", "cells", "minutes", "cells/s", "plate of 384 frames, minutes",
            "latency p50 s", "latency p95 s", "RSS MB start", "RSS MB end", "load avg"]
    rows = []
    for name, r in runs:
        per_frame = r["seconds"] / max(1, r["frames"])
        rows.append([name, r["runtime"], f"{r['frames']}/{r['of']}", r["cells"], r["seconds"] / 60, r["cells_per_s"],
                     per_frame * 384 / 60, r["p50"], r["p95"], r["samples"][0][2], r["samples"][-1][2], os.getloadavg()[0]])
    auto = runs[-1][1]
    backlog = [[f"{t / 60:.1f}", b, m] for t, b, m in auto["samples"]]
    text = [
        "# A whole plate through the running service",
        "",
        f"Command: `.venv/bin/python bench/bench_plate.py --frames {args.frames} --cells {args.cells} --arrival-s {args.arrival_s:g}`. "
        f"{args.frames} frames (1224 x 904 px, {PX_UM} um/px, phase + Apo-15) land in the watched folder "
        + ("at once" if not args.arrival_s else f"one every {args.arrival_s:g} s")
        + f"; the real service counts them with the default preset's encoder; {os.cpu_count()} CPU cores. "
        "The torch row is the baseline of the same run over its first frames; its plate time is projected from its "
        "per-frame time.",
        "",
        table(head, rows),
        "",
        "Backlog (frames landed but not yet counted) and resident memory, default service:",
        "",
        table(["minute", "backlog", "RSS MB"], backlog),
    ]
    if args.soak:
        v = rss_verdict(auto["per_frame"], args.warmup)
        n = len(auto["per_frame"])
        tps = -(-n // (4 * args.wells))
        text[0] = "# Soak: many timepoints of a plate through the running service, RSS after the warm-up"
        text[2] = (f"Command: `.venv/bin/python bench/bench_plate.py --soak --wells {args.wells} --frames {args.frames} --cells {args.cells} "
                   f"--baseline-frames {args.baseline_frames} --warmup {args.warmup:g}"
                   + (f" --memory-timepoints {args.memory_timepoints}" if args.memory_timepoints is not None else "")
                   + f"`. A plate of {args.wells} wells x 4 fields "
                   f"({4 * args.wells} frames of 1224 x 904 px, {PX_UM} um/px, phase + Apo-15, about {args.cells} cells each) lands one "
                   f"timepoint at a time, each once the previous one is counted: {tps} timepoints, {n} frames, tracks linking them; "
                   f"the real service with the default preset's encoder; {os.cpu_count()} CPU cores.")
        text += ["", "Resident memory after the warm-up (RSS after every frame):", "",
                 table(["frames", "warm-up frames", "peak MB, 1st quarter after warm-up", "peak MB, last quarter", "peak MB", "growth",
                        "slope between the two, MB / 100 frames", "that slope over a day (9,216 frames), MB", "verdict (< +10%)"],
                       [[n, v["warmup_frames"], v["start"], v["end"], v["peak"], f"{v['growth_pct']:+.1f}%", v["slope_mb_per_100"],
                         v["day_mb"], "PASS" if v["pass"] else "FAIL"]]),
                 "", "RSS after each timepoint:", "",
                 table(["timepoint", "frames", "RSS MB"],
                       [[k // (4 * args.wells) + 1, k + 1, auto["per_frame"][k]] for k in range(4 * args.wells - 1, n, 4 * args.wells)])]
    emit(text, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
