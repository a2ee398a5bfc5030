"""Service throughput, stage times and memory over a long run (CPU or GPU).

Renders a synthetic time-lapse (the demo generator), builds the demo's
reference index, then replays N frames through the real service
(readers, ledger, CSV sink, Prometheus sink) and prints:

1. per-stage seconds per frame and cells/s, for encoder batch sizes 1 and 64
   (batch 1 is the baseline; ratio = baseline time / time);
2. resident memory (RSS) every few frames over the long run, and its growth
   from the first quarter to the end (peer tools' most common complaint is
   memory that grows over long headless runs).

Usage: python bench/bench_service.py [--frames 120] [--out bench/results/service.md]
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def demo_workspace(prefix: str, say=lambda m: print(m, file=sys.stderr)):  # type: ignore[no-untyped-def]
    """A temporary folder with the demo's config (no metrics port), its reference index built and an empty watch folder:
    (folder, config, registry), as the benches that replay demo frames need."""
    from monitor.config import load_config
    from monitor.demo.run import DEMO_CONFIG, bootstrap_pipeline, build_reference
    from monitor.protocols import BuildContext
    from monitor.registry import Registry

    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "demo.toml").write_text(DEMO_CONFIG.replace("metrics_port = 9108", "metrics_port = 0"))
    cfg = load_config(work / "demo.toml")
    reg = Registry()
    boot = bootstrap_pipeline(cfg, reg, BuildContext(state_dir=cfg.service.state_dir))
    build_reference(boot, 30, 7, say).save(cfg.classifier.index)
    cfg.service.watch_dir.mkdir(parents=True, exist_ok=True)  # the 'microscope export folder', empty
    return work, cfg, reg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from monitor.demo.run import FIELD_PX, FRAME_UM, write_frame
    from monitor.demo.synthetic import make_cells, render_field
    from monitor.service.wiring import build_service

    work, cfg, reg = demo_workspace("cellmonitor-bench-")

    rng = np.random.default_rng(3)
    cells = make_cells(16, FIELD_PX * FRAME_UM, rng, onset_scale=6.0, n_timepoints=args.frames)
    import os

    load0 = os.getloadavg()[0]
    lines = ["# Service benchmark", "", f"Command: `python bench/bench_service.py --frames {args.frames}` ({os.cpu_count()} CPUs)", ""]
    # 1) stage times at two batch sizes, on the same 6 frames
    from monitor.intake.assemble import merge
    from monitor.pipeline import process_frame
    from monitor.records import Acquisition, FrameKey

    frames = []
    for t in range(6):
        ph, fl, _ = render_field(cells, t, (FIELD_PX, FIELD_PX), FRAME_UM, t)
        acq = Acquisition(Path(f"t{t}.tif"), FrameKey("b", "A1", "1", t), {"phase": ph, "apo15": fl}, FRAME_UM, "config", "synthetic")
        frames.append(merge([acq], "phase", "apo15"))
    svc, _ = build_service(cfg, reg, serve_metrics=False)
    rows = []
    for bs in (1, 64):
        svc.pipeline.batch_size = bs
        tot: dict[str, float] = {}
        n_cells = 0
        for f in frames:
            c = process_frame(f, svc.pipeline)
            n_cells += c.n_cells
            for k, v in c.stage_seconds.items():
                tot[k] = tot.get(k, 0.0) + v
        rows.append((bs, {k: v / len(frames) for k, v in tot.items()}, n_cells / sum(tot.values())))
    base = sum(rows[0][1].values())
    stages = list(rows[0][1])
    lines += ["## Stage seconds per frame (560x560 px at 0.4 um/px, ~16 cells, EfficientNet-Lite0, CPU)", ""]
    lines.append("| batch | " + " | ".join(stages) + " | total s/frame | cells/s | speed-up vs batch 1 |")
    lines.append("|---|" + "---|" * (len(stages) + 3))
    for bs, st, cps in rows:
        total = sum(st.values())
        lines.append(f"| {bs} | " + " | ".join(f"{st[s]:.3f}" for s in stages) + f" | {total:.2f} | {cps:.1f} | {base / total:.2f}x |")

    # 2) long run through the real service: files written, watcher off, replay until idle
    svc.pipeline.batch_size = 64
    watch = cfg.service.watch_dir
    watch.mkdir(parents=True, exist_ok=True)
    samples = []
    t0 = time.perf_counter()
    done = [0]

    def on_counts(c):  # type: ignore[no-untyped-def]
        done[0] += 1
        if done[0] % 10 == 0:
            gc.collect()
            samples.append((done[0], rss_mb()))
            print(f"  {done[0]}/{args.frames} frames, RSS {samples[-1][1]:.0f} MB", file=sys.stderr)

    svc.on_counts = on_counts
    stop = threading.Event()
    th = threading.Thread(target=svc.run, args=(stop,))
    th.start()
    for t in range(args.frames):
        ph, fl, _ = render_field(cells, t % 12, (FIELD_PX, FIELD_PX), FRAME_UM, 100 + t)
        write_frame(watch, "A1", t + 1, ph, fl)
        while done[0] < t - 4:  # keep a small backlog, like a fast microscope
            time.sleep(0.05)
    while done[0] < args.frames and th.is_alive():
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    svc.close()
    q = max(1, len(samples) // 4)
    early = float(np.mean([m for _, m in samples[:q]]))
    late = float(np.mean([m for _, m in samples[-q:]]))
    lines += ["", f"## Long run: {args.frames} frames through the service (watcher, ledger, CSV, metrics)", ""]
    lines.append("| frames | wall s | frames/min | RSS first quarter MB | RSS last quarter MB | growth MB |")
    lines.append("|---|---|---|---|---|---|")
    lines.append(f"| {done[0]} | {wall:.0f} | {60 * done[0] / wall:.1f} | {early:.0f} | {late:.0f} | {late - early:+.0f} |")
    lines.append("")
    lines.append("RSS samples (frame: MB): " + ", ".join(f"{n}: {m:.0f}" for n, m in samples))
    lines.append("")
    load1 = os.getloadavg()[0]
    busy = " (above the CPU count: other jobs shared the machine)" if max(load0, load1) > (os.cpu_count() or 1) else " (a quiet machine)"
    lines.append(f"1-minute load average at start {load0:.1f}, at end {load1:.1f}{busy}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
