"""Soak: a burst of frames, then a long run, through the real service with fast fake plugins.

The service is the real one (watchdog observer, file tracker, ledger in WAL
mode, per-timepoint table, fsync-ed CSV record of truth, Prometheus metrics,
quarantine); only the reader, segmenter and encoder are the fast fakes of
:mod:`monitor.testing`, so thousands of frames run in minutes on 2 cores and
what is measured is the service itself.

1. Burst: ``--burst`` frames (default 1,000) land in the watch folder at once
   while the service runs; the time until every one is in the CSV is reported.
2. Soak: ``--frames`` more (default 2,000) arrive in chunks of ``--chunk``;
   resident memory (RSS) is sampled after each chunk. The baseline is the RSS
   after the first chunk of the soak (the burst is the warm-up), measured in
   the same run; the target is growth below 10% by the end.

Every frame must be counted exactly once (checked against the CSV); a few
bad files are mixed in and must be quarantined.

Usage: python bench/bench_soak.py [--burst 1000] [--frames 2000] [--chunk 100] [--write bench/results/soak.md]
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def frame(i: int, size: int = 192) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = rng.normal(0.1, 0.01, (size, size)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for k in range(1 + i % 6):
        cy, cx = 20 + (k // 4) * 40, 20 + (k % 4) * 40
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 0.3 if (i + k) % 3 else 0.9
    return img


def build(tmp: Path):  # type: ignore[no-untyped-def]
    from cellmonitor_plugins.sinks.csv import CsvSink
    from cellmonitor_plugins.sinks.prometheus import PrometheusSink
    from prometheus_client import CollectorRegistry

    from monitor.config import parse_config
    from monitor.imaging import display_range
    from monitor.index.ewc import EWCClassifier, EWCParams
    from monitor.index.store import ReferenceIndex
    from monitor.intake.readers import ReaderSet
    from monitor.pipeline import Pipeline
    from monitor.service.metrics import ServiceMetrics
    from monitor.service.wiring import assemble_service
    from monitor.testing import ArrayReader, DiscSegmenter, MeanColourEncoder

    cfg = parse_config({"service": {"watch_dir": "in", "state_dir": "state", "stable_s": 0.05, "ready_deadline_s": 2.0,
                                    "patterns": ["*.npy"], "metrics_port": 0}}, "soak.toml", tmp)
    cfg.service.watch_dir.mkdir(parents=True, exist_ok=True)
    enc = MeanColourEncoder()
    crops, labels = [], []
    for lab, b in ((0, 0.3), (1, 0.9)):
        for s in range(6):
            img = frame(0)
            img[:] = 0.1
            img[10:30, 10:30] = b + 0.02 * s
            img[0, 0] = 1.0
            crops.append(np.pad(display_range(img)[10:30, 10:30], ((0, 4), (0, 4), (0, 0)), mode="edge"))
            labels.append(lab)
    index = ReferenceIndex.build(enc.encode(np.stack(crops)), np.array(labels), ("live", "dead"),
                                 [{"name": enc.name, "id": enc.id, "dim": enc.dim}], ewc=EWCParams(1, 4, 0.5, True))
    pipe = Pipeline(DiscSegmenter(), [enc], EWCClassifier(index), pixel_size_um=0.322, crop_px=24)
    metrics = ServiceMetrics(CollectorRegistry(), "soak")
    sinks = [CsvSink(cfg.service.state_dir / "counts.csv"), PrometheusSink(metrics)]
    return assemble_service(cfg, ReaderSet([ArrayReader()]), pipe, sinks, metrics, tick_s=0.05, rescan_s=5.0)


def write_frames(watch: Path, start: int, n: int, tmp: Path) -> None:
    """Frames as a microscope writes them: into a temporary name, then renamed into place."""
    for i in range(start, start + n):
        well, t = f"{'ABCDEFGH'[i % 8]}{1 + (i // 8) % 12}", 1 + i // 96
        part = tmp / f".part{i}.npy"
        np.save(part, frame(i))
        os.replace(part, watch / f"{well}_t{t}_phase.npy")


def n_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return max(0, sum(1 for _ in f) - 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cellmonitor-soak-"))
    svc = build(tmp)
    watch, counts = svc.settings.watch_dir, svc.settings.state_dir / "counts.csv"
    stop = threading.Event()
    th = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    th.start()
    time.sleep(0.5)
    rss_start = rss_mb()

    def wait_for(n: int, timeout: float) -> float:
        t0 = time.perf_counter()
        while n_rows(counts) < n:
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"only {n_rows(counts)} of {n} frames counted after {timeout:.0f}s")
            time.sleep(0.05)
        return time.perf_counter() - t0

    # 1. burst
    staging = tmp / "staging"
    staging.mkdir()
    write_frames(staging, 0, args.burst, tmp)
    t0 = time.perf_counter()
    for p in sorted(staging.iterdir()):
        os.replace(p, watch / p.name)  # all at once
    (watch / "Z9_t1_phase.npy").write_bytes(b"not an array")  # a bad file in the burst
    burst_s = time.perf_counter() - t0 + wait_for(args.burst, 3600)
    gc.collect()
    rss_after_burst = rss_mb()

    # 2. soak
    samples: list[tuple[int, float, float]] = []
    done = args.burst
    t_soak = time.perf_counter()
    while done < args.burst + args.frames:
        n = min(args.chunk, args.burst + args.frames - done)
        write_frames(watch, done, n, tmp)
        done += n
        wait_for(done, 600)
        gc.collect()
        samples.append((done - args.burst, rss_mb(), time.perf_counter() - t_soak))
    soak_s = time.perf_counter() - t_soak
    stop.set()
    th.join(30)
    ledger_counts = svc.recorder.ledger.counts()
    svc.close()

    with counts.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [(r["well"], r["timepoint"]) for r in rows]
    exactly_once = len(keys) == len(set(keys)) == args.burst + args.frames
    quarantined = n_rows(svc.settings.state_dir / "quarantine.csv")
    base = samples[0][1]
    growth = (samples[-1][1] - base) / base
    peak = max(s[1] for s in samples)

    out = []
    out.append(f"# Soak: {args.burst} frames at once, then {args.frames} more in chunks of {args.chunk}\n")
    out.append(f"`python bench/bench_soak.py --burst {args.burst} --frames {args.frames} --chunk {args.chunk}` on "
               f"{platform.machine()} with {os.cpu_count()} CPU(s), Python {platform.python_version()}; the real service "
               "(observer, tracker, ledger, fsync-ed CSV, metrics) with the fast fakes of monitor.testing "
               "(192x192 frames, 1-6 cells each).\n")
    out.append("| phase | frames | seconds | frames/s |")
    out.append("|---|---|---|---|")
    out.append(f"| burst (all files land at once) | {args.burst} | {burst_s:.1f} | {args.burst / burst_s:.1f} |")
    out.append(f"| soak (chunks of {args.chunk}) | {args.frames} | {soak_s:.1f} | {args.frames / soak_s:.1f} |")
    out.append("")
    out.append(f"Every frame in the CSV exactly once: **{'yes' if exactly_once else 'NO'}** ({len(keys)} rows); "
               f"bad files quarantined: {quarantined} of 1; ledger: {ledger_counts}.\n")
    out.append("Resident memory (RSS, MB) after each chunk of the soak; baseline = after the first chunk "
               "(the burst before it is the warm-up), same run:\n")
    out.append("| soak frames | RSS MB | vs baseline |")
    out.append("|---|---|---|")
    out.append(f"| (service started, before the burst) | {rss_start:.1f} | |")
    out.append(f"| (after the {args.burst}-frame burst) | {rss_after_burst:.1f} | |")
    step = max(1, len(samples) // 10)
    for k, (n, mb, _) in enumerate(samples):
        if k % step == 0 or k == len(samples) - 1:
            out.append(f"| {n} | {mb:.1f} | {(mb - base) / base:+.1%}{' (baseline)' if k == 0 else ''} |")
    out.append("")
    verdict = "PASS" if growth < 0.10 and exactly_once else "FAIL"
    out.append(f"RSS growth over the soak: **{growth:+.1%}** (peak {peak:.1f} MB; target < +10%): **{verdict}**")
    text = "\n".join(out)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text + "\n")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
