"""Replay on a Ray cluster: frames/s for 1 and 2 workers against the plain local replay, and the
driver's recording ceiling.

All three replays take the same frames (the demo's synthetic time-lapse, phase + Apo-15
TIFFs, classical segmenter, EfficientNet-Lite0, the demo's EWC-FAISS index, CSV and
Prometheus sinks), each into a fresh state folder, measured in the same run on a local
Ray cluster started here. The ceiling replays many more (empty) files with no-op workers
that return precomputed Counts at once, so only the driver works: grouping, the ledger,
the CSV record of truth (fsync per row) and Prometheus.

Figures: wall seconds from the command's start (models loaded, workers started) to the
last frame, and the steady rate (frames/s between the first and the last recorded frame).

Usage: python bench/bench_cluster.py [--frames 32] [--ceiling-frames 2000] [--out bench/results/cluster.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Clock:
    """Times of recorded frames (the replay's on_counts hook)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.counts: list[Any] = []
        self.startup_s = 0.0

    def __call__(self, counts: Any) -> None:
        self.times.append(time.perf_counter())
        self.counts.append(counts)

    def figures(self, startup_s: float) -> tuple[int, float, float, float]:
        """(frames, wall s, start-up s, frames/s after start-up)."""
        n = len(self.times)
        wall = self.times[-1] - self.t0 if n else float("nan")
        return n, wall, startup_s, n / (wall - startup_s)


def csv_rows(state: Path) -> list[dict[str, str]]:
    """The CSV's rows without the columns that say when and how long (they differ between runs)."""
    import csv

    with (state / "counts.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("processed_at", "seconds_total")} for r in csv.DictReader(f)]


def with_state(cfg: Any, state: Path, watch: Path | None = None) -> Any:
    upd = {"state_dir": state} | ({"watch_dir": watch} if watch is not None else {})
    return cfg.model_copy(update={"service": cfg.service.model_copy(update=upd)})


def local_replay(cfg: Any, reg: Any) -> Clock:
    from monitor.service.wiring import build_service

    clock = Clock()
    svc, _ = build_service(cfg, reg, serve_metrics=False)
    clock.startup_s = time.perf_counter() - clock.t0
    svc.on_counts = clock
    try:
        svc.run(threading.Event(), until_idle=True, observe=False)
    finally:
        svc.close()
    return clock


def make_noop_worker(template: Any) -> type:
    """A worker that reads nothing and returns ``template`` re-keyed for each frame at once."""
    from monitor.intake.events import FrameResult
    from monitor.records import Acquisition, FrameKey

    class NoOpWorker:
        def __init__(self, cfg: Any):
            self.cfg = cfg

        def info(self) -> dict[str, Any]:
            from monitor import __version__

            return {"pid": os.getpid(), "host": "noop", "classes": tuple(template.counts), "failure": None, "version": __version__}

        def identify(self, paths: list[str]) -> list[Any]:
            out = []
            for p in paths:
                _, well, _, t, channel = Path(p).stem.split("_")
                out.append(Acquisition(Path(p), FrameKey("demo", well, "1", int(t[1:])), {channel: np.zeros((1, 1), np.uint8)},
                                       0.4, "config", "synthetic", roles={}))
            return out

        def process(self, units: list[list[str]], keep_calls: bool = False) -> list[list[Any]]:
            out = []
            for paths in units:
                _, well, _, t, _ = Path(paths[0]).stem.split("_")
                key = FrameKey("demo", well, "1", int(t[1:]))
                srcs = tuple(Path(p) for p in paths)
                out.append([FrameResult(key, srcs, replace(template, key=key, sources=srcs))])
            return out

    return NoOpWorker


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--ceiling-frames", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("bench/results/cluster.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from bench.bench_service import demo_workspace
    from monitor.demo.run import FIELD_PX, FRAME_UM, write_frame
    from monitor.demo.synthetic import make_cells, render_field
    from monitor.service.cluster import ClusterReplay

    print("building the demo's reference index ...", file=sys.stderr)
    work, cfg, reg = demo_workspace("cellmonitor-bench-cluster-", say=lambda m: None)
    watch = cfg.service.watch_dir
    watch.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    cells = make_cells(16, FIELD_PX * FRAME_UM, rng, onset_scale=6.0, n_timepoints=12)
    for i in range(args.frames):
        ph, fl, _ = render_field(cells, i % 12, (FIELD_PX, FIELD_PX), FRAME_UM, 100 + i)
        write_frame(watch, f"A{1 + i // 12}", 1 + i % 12, ph, fl)
    load0 = os.getloadavg()[0]

    results: list[tuple[str, int, float, float, float]] = []
    print(f"local replay of {args.frames} frames ...", file=sys.stderr)
    local = local_replay(with_state(cfg, work / "state-local"), reg)
    results.append(("local replay (one process)", *local.figures(local.startup_s)))
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        rows_local = csv_rows(work / "state-local")
        same_rows: list[str] = []
        for n in (1, 2):
            print(f"ray replay, {n} worker(s) ...", file=sys.stderr)
            clock = Clock()
            eng = ClusterReplay(with_state(cfg, work / f"state-ray{n}"), reg, workers=n, serve_metrics=False, on_counts=clock)
            stats = eng.run()
            results.append((f"--engine ray, {n} worker(s)", *clock.figures(stats.startup_s)))
            rows = csv_rows(work / f"state-ray{n}")
            diff = sum(a != b for a, b in zip(rows, rows_local, strict=False)) + abs(len(rows) - len(rows_local))
            same_rows.append(f"{n} worker(s): {'identical' if diff == 0 else f'{diff} row(s) differ'}")
        # the driver alone: no-op workers, many empty files named like the demo's
        empty = work / "empty"
        empty.mkdir()
        for i in range(args.ceiling_frames):
            for ch in ("phase", "apo15"):
                (empty / f"demo_W{1 + i // 1000}_f1_t{1 + i % 1000:04d}_{ch}.tif").touch()
        print(f"recording ceiling, {args.ceiling_frames} frames, 2 no-op workers ...", file=sys.stderr)
        clock = Clock()
        eng = ClusterReplay(with_state(cfg, work / "state-noop", empty), reg, workers=2, serve_metrics=False, on_counts=clock,
                            worker_class=make_noop_worker(local.counts[0]))
        stats = eng.run()
        results.append(("driver ceiling: 2 no-op workers (recording only)", *clock.figures(stats.startup_s)))
    finally:
        ray.shutdown()

    base = results[0][4]
    lines = [
        "# Replay on a Ray cluster",
        "",
        f"Command: `python bench/bench_cluster.py --frames {args.frames} --ceiling-frames {args.ceiling_frames}` "
        f"({os.cpu_count()} CPUs; 1-minute load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end)",
        "",
        "The same frames (the demo's synthetic time-lapse: 560x560 px phase + Apo-15 TIFFs, ~16 cells each; classical "
        "segmenter, EfficientNet-Lite0, EWC-FAISS, CSV + Prometheus sinks), each replay into a fresh state folder. "
        "Wall: from the start to the last frame recorded; start-up: loading the models and index (local) or connecting, "
        "starting the workers and loading theirs (ray); frames/s: frames / (wall - start-up), the rate an archive "
        "of many frames approaches. The ceiling row replays empty files with no-op workers that return "
        "precomputed Counts: the driver's grouping, ledger, CSV (fsync per row) and Prometheus alone.",
        "",
        "| replay | frames | wall s | start-up s | frames/s after start-up | vs local |",
        "|---|---|---|---|---|---|",
    ]
    for name, n, wall, startup, rate in results:
        lines.append(f"| {name} | {n} | {wall:.1f} | {startup:.1f} | {rate:.2f} | {rate / base:.2f}x |")
    lines += ["", f"counts.csv against the local replay's, row for row (all columns but processed_at and seconds_total): {'; '.join(same_rows)}"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
