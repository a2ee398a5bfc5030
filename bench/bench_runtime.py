"""The CNN encoders on torch vs a CPU inference runtime (ONNX Runtime, OpenVINO): speed and same calls.

    .venv/bin/python bench/bench_runtime.py [--presets balanced,fast] [--loaded] [--stream-frames 16] [--write bench/results/runtime.md]

Speed: cells per second end to end (segment, crop, embed, classify:
:func:`monitor.pipeline.process_frames` on the service's pipeline) on a Lionheart-size
frame (1224 x 904 px) tiled from real livedead frames at 0.7 um/px, every runtime on the
same frame in the same run, best of 3 after a warm-up in each of ``--rounds`` rounds over the
runtimes in turn (the best round kept: a job that comes and goes meets them alike); torch is
the baseline. A second baseline, ``v1 path``, is the CPU path as the issue found it: torch
eager with the classical segmenter as it was before the speed work (``bench/_segmenter_baseline.py``,
frozen), timed on the same frame in the same rounds (column ``x v1 path``). With
``--loaded`` the same is measured again while two busy processes (numpy matrix products)
share the 2 cores, as on a lab PC that also runs the acquisition software.

Sustained: a backlog of ``--stream-frames`` such frames through the service's own schedule
(:meth:`monitor.service.loop.Service.handle_all`: calls of ``frames_per_call`` frames to
:func:`~monitor.pipeline.process_frames`, the next call's first frame segmented ahead by a
:class:`~monitor.pipeline.SegmentAhead` while this call embeds): what a plate that lands at
once sees. Each frame's calls (the state of every cell) are compared with torch's in the same
run; the CPU the other processes on the machine took meanwhile is measured (``/proc/stat``).

Same calls: the index of each preset is built once (``cellmonitor index build --preset P``
on the pbc training part, and on the livedead training frames); its test cells are embedded
by each runtime (no embedding cache) and classified by EWC-FAISS: the share of cells whose
call is the same as torch's and each runtime's macro accuracy (pbc 90/10 stratified, livedead
90/10 by frame, as ``bench/bench_presets.py``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import emit, need_data  # noqa: E402
from bench.bench_e2e_livedead import service_pipeline  # noqa: E402
from bench.bench_presets import (  # noqa: E402
    LIVEDEAD_SEGMENTER,
    PIXEL_SIZE_UM,
    cli,
    lionheart_frame,
    standard_sets,
)

RUNTIMES = ("torch", "onnxruntime", "openvino")


def _burn(stop: Any) -> None:
    a = np.random.default_rng(0).random((400, 400))
    while not stop.is_set():
        a = a @ a
        a /= np.abs(a).max()


class Load:
    """Two busy processes for the duration of a ``with`` block (``n = 0``: none)."""

    def __init__(self, n: int):
        self.n, self.stop, self.procs = n, mp.Event(), []

    def __enter__(self) -> Load:
        os.environ["OMP_NUM_THREADS"] = "1"
        self.procs = [mp.Process(target=_burn, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(1.0 if self.n else 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(5)


def baseline_threads() -> None:
    """torch and BLAS at the machine's threads, as the torch baseline runs (a runtime's pipeline
    then leaves each one thread: :func:`monitor.service.wiring.torch_threads_beside_runtime`)."""
    import torch

    from monitor.device import cpu_cores
    from monitor.service.wiring import blas_threads

    torch.set_num_threads(cpu_cores())
    blas_threads(cpu_cores())


def threads_of(p: Any) -> None:
    """torch's and BLAS's threads as the service sets them for ``p``'s encoders (the torch baseline: the
    machine's; beside a runtime: one each), before each measurement (the settings are the process's)."""
    from monitor.service.wiring import torch_threads_beside_runtime

    baseline_threads()
    torch_threads_beside_runtime(p.encoders)


def pipeline_on(index: Path, preset: str, runtime: str, work: Path) -> Any:
    from dataclasses import replace

    from monitor.index.presets import PRESETS

    baseline_threads()
    encs = [(n, {**o, "runtime": runtime}) for n, o in PRESETS[preset].encoders]
    return replace(service_pipeline(index, preset, LIVEDEAD_SEGMENTER, work, PIXEL_SIZE_UM, encs), crop_framing="box")


class V1Segmenter:
    """The classical segmenter before the speed work (``bench/_segmenter_baseline.py``), as a segmenter plugin."""

    name = "classical (before the speed work)"

    def __init__(self, options: dict[str, Any]):
        from cellmonitor_plugins.segmenters.classical import Options

        self.o = Options(**options)

    def segment(self, frame: Any) -> Any:
        from bench import _segmenter_baseline as baseline

        o, um = self.o, frame.pixel_size_um
        low = o.min_area_um2 if o.min_area_um2 is not None else 0.0
        return baseline.cells_from_labels(baseline.segment_image(frame.image, um, o), um, low, o.max_area_um2, o.exclude_border)


def speed(p: Any, frame: Any, repeats: int = 3) -> tuple[int, float, dict[str, float]]:
    from monitor.pipeline import process_frames

    process_frames([frame], p)  # warm-up
    best, n, stages = float("inf"), 0, {}
    for _ in range(repeats):
        t = time.perf_counter()
        (c,) = process_frames([frame], p)
        dt = time.perf_counter() - t
        if dt < best:
            best, n, stages = dt, c.n_cells, dict(c.stage_seconds)
    return n, best, stages


class OtherCpu:
    """Cores the machine's other processes kept busy during a ``with`` block (``/proc/stat`` minus this process)."""

    value = float("nan")

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def __enter__(self) -> OtherCpu:
        t = os.times()
        self.busy, self.own, self.t = self._busy(), t.user + t.system + t.children_user + t.children_system, time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system - self.own
        self.value = max(0.0, (self._busy() - self.busy - own) / (time.perf_counter() - self.t))


def stream(p: Any, image: np.ndarray, n: int) -> tuple[int, float, list[np.ndarray]]:
    """``n`` frames (each its own Frame of ``image``) through the service's schedule (``Service.handle_all``:
    calls of ``frames_per_call``, the next call's first frame segmented ahead while this call embeds);
    (cells, seconds per frame, each frame's per-cell states)."""
    from dataclasses import replace

    from monitor.pipeline import SegmentAhead, process_frames
    from monitor.records import Frame, FrameKey

    p = replace(p, keep_calls=True)
    frames = [Frame(FrameKey("stream", "A1", str(i), i), {"image": image}, "image", None, PIXEL_SIZE_UM, "config", "bench")
              for i in range(n + 1)]
    process_frames(frames[:1], p)  # warm-up
    k = max(1, p.frames_per_call)
    calls_ = [frames[1 + i : 1 + i + k] for i in range(0, n, k)]
    ahead = SegmentAhead(p) if p.prefetch and len(calls_) > 1 else None
    states, cells = [], 0
    t = time.perf_counter()
    try:
        for j, call in enumerate(calls_):
            if ahead is not None and j + 1 < len(calls_):
                ahead.submit(calls_[j + 1][0])
            for c in process_frames(call, p, ahead):
                if not hasattr(c, "n_cells"):
                    raise RuntimeError(f"a frame failed: {c}")
                cells += c.n_cells
                states.append(c.calls.predicted)
    finally:
        if ahead is not None:
            ahead.close()
    return cells, (time.perf_counter() - t) / n, states


def verdict(rows: list[list[Any]], stream_rows: list[list[Any]]) -> list[str]:
    """One line per preset, load and runtime: which of its figures reach 2x its torch baseline and which do not."""
    out = []
    for r in stream_rows:
        if r[2].startswith("torch"):
            continue
        single = next(x for x in rows if x[:3] == r[:3])
        figs = [("one frame", single[6]), ("sustained, vs torch sustained", r[7]), ("sustained, vs torch's best figure", r[8]),
                ("one frame, vs the v1 path", single[7])]
        meets = [f"{name} {x:.2f}x" for name, x in figs if x >= 2]
        fails = [f"{name} {x:.2f}x" for name, x in figs if x < 2]
        out.append(f"- `{r[0]}`, added load {r[1]}, other processes {r[10]:.2f} cores, {r[2]}: **meets 2x**: {', '.join(meets) or 'none'}; "
                   f"below 2x: {', '.join(fails) or 'none'}; same calls as torch {r[9]:.3f}.")
    return out


def calls(index_dir: Path, test: Path, runtime: str) -> tuple[np.ndarray, float, list[str]]:
    """EWC calls (class indices) of the test set's cells embedded on ``runtime``, and the macro accuracy."""
    from monitor.config import PluginRef
    from monitor.index.cache import embed_dataset
    from monitor.index.dataset import Preprocess, scan
    from monitor.index.evaluate import evaluate
    from monitor.index.ewc import EWCClassifier
    from monitor.index.query import query_encoders
    from monitor.index.store import ReferenceIndex
    from monitor.protocols import BuildContext
    from monitor.registry import Registry
    from monitor.service.wiring import torch_threads_beside_runtime

    meta = json.loads((index_dir / "meta.json").read_text())
    reg, ctx = Registry(), BuildContext(state_dir=index_dir, device="cpu")
    encoders = [reg.build("encoders", PluginRef(name=e["name"], options={**(e.get("options") or {}), "runtime": runtime}), ctx)
                for e in meta["encoders"]]
    assert all(e.runtime.startswith(runtime) for e in encoders), [e.runtime for e in encoders]
    baseline_threads()
    torch_threads_beside_runtime(encoders)  # the threads the service runs them with (torch and BLAS)
    index = ReferenceIndex.load(index_dir, [{"id": e.id, "dim": e.dim} for e in encoders])
    prep = Preprocess.from_dict(index.preprocessing or {})
    ds = scan(test, [c for c in scan(test).classes if c in index.classes])
    emb = embed_dataset(ds, query_encoders(encoders, index.meta), prep, None, 32, progress=False)
    y = [emb.classes[i] for i in emb.labels]
    vectors = emb.concat([e.id for e in encoders])
    ev = evaluate(index, vectors, y)
    return np.asarray(EWCClassifier(index, index.ewc).classify(vectors).predicted), float(ev.ewc.macro_accuracy), y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="balanced,fast")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--loaded", action="store_true", help="measure speed a second time with two busy processes")
    ap.add_argument("--skip-calls", action="store_true")
    ap.add_argument("--stream-frames", type=int, default=16, help="frames of the sustained backlog (0: not measured)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every runtime; each figure is its best round")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    need_data()
    import torch
    from cellmonitor_plugins.encoders.runtime import available

    from monitor.records import Frame, FrameKey
    from monitor.report.classification import table

    torch.set_num_threads(2)
    runtimes = ["torch", *(r for r in args.runtimes.split(",") if r != "torch" and available(r))]  # torch first: the baseline
    presets = [p for p in args.presets.split(",") if p]
    speed_rows: list[list[Any]] = []
    stream_rows: list[list[Any]] = []
    call_rows: list[list[object]] = []
    os.environ.setdefault("CELLMONITOR_RUNTIME_CACHE", tempfile.mkdtemp(prefix="cellmonitor-bench-runtime-"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pbc_train, pbc_test, ldt, lde, ld_train, ld_test = standard_sets(work)
        frame = Frame(FrameKey("speed", "A1", "1", 0), {"image": lionheart_frame(ld_test + ld_train)}, "image", None,
                      PIXEL_SIZE_UM, "config", "bench")
        for preset in presets:
            indexes = {}
            for name, tr in (("pbc", pbc_train), ("livedead", ldt)):
                indexes[name] = work / f"index-{preset}-{name}"
                cli("index", "build", str(tr), "--out", str(indexes[name]), "--preset", preset, "--no-progress")
            pipes = {runtime: pipeline_on(indexes["livedead"], preset, runtime, work) for runtime in runtimes}
            v1 = replace(pipes["torch"], segmenter=V1Segmenter(LIVEDEAD_SEGMENTER))
            for loaded in ([0, 2] if args.loaded else [0]):
                machine = "2 busy processes" if loaded else "none"
                single: dict[str, tuple[Any, ...]] = {}
                backlog: dict[str, tuple[Any, ...]] = {}
                labels: dict[str, str] = {}
                with Load(loaded):
                    # rounds over every runtime in turn, the best of each kept: another job that comes and
                    # goes on the machine meets every runtime alike instead of the one measured at that time
                    for _ in range(args.rounds):
                        threads_of(v1)
                        with OtherCpu() as other:
                            n, secs, st = speed(v1, frame)
                        if "v1" not in single or secs < single["v1"][1]:
                            single["v1"] = (n, secs, st, other.value, os.getloadavg()[0])
                        for runtime, p in pipes.items():
                            threads_of(p)
                            labels[runtime] = p.encoders[0].runtime  # torch's threads as measured (its label reads them now)
                            with OtherCpu() as other:
                                n, secs, st = speed(p, frame)
                            if runtime not in single or secs < single[runtime][1]:
                                single[runtime] = (n, secs, st, other.value, os.getloadavg()[0])
                            if not args.stream_frames:
                                continue
                            with OtherCpu() as other:
                                cells, per_frame, states = stream(p, frame.image, args.stream_frames)
                            if runtime not in backlog or per_frame < backlog[runtime][1]:
                                backlog[runtime] = (cells, per_frame, states, other.value, os.getloadavg()[0])
                base, base_v1 = single[runtimes[0]][1], single["v1"][1]
                labels["v1"] = "v1 path: " + labels[runtimes[0]] + ", segmenter before the speed work"
                for runtime in ["v1", *pipes]:
                    n, secs, st, other_cores, load = single[runtime]
                    speed_rows.append([preset, machine, labels[runtime], n, secs, n / secs, base / secs, base_v1 / secs,
                                       st.get("segment", float("nan")), st.get("embed", float("nan")), other_cores, load])
                    print(table(SPEED_HEAD, speed_rows[-1:]), flush=True)
                for runtime in pipes if args.stream_frames else ():
                    cells, per_frame, states, other_cores, load = backlog[runtime]
                    base_stream, base_states = backlog[runtimes[0]][1], backlog[runtimes[0]][2]
                    same = [a == b for x, y in zip(states, base_states, strict=True) for a, b in zip(x, y, strict=True)]
                    if sum(len(x) for x in states) != len(same):
                        raise RuntimeError("a frame has another number of cells on this runtime than on torch")
                    stream_rows.append([preset, machine, labels[runtime], args.stream_frames, cells, per_frame,
                                        cells / args.stream_frames / per_frame, base_stream / per_frame,
                                        min(base, base_stream) / per_frame, float(np.mean(same)) if same else 1.0,
                                        other_cores, load])
                    print(table(STREAM_HEAD, stream_rows[-1:]), flush=True)
            del pipes
            if args.skip_calls:
                continue
            for name, test in (("pbc 90/10", pbc_test), ("livedead by frame", lde)):
                idx = indexes["pbc" if name.startswith("pbc") else "livedead"]
                ref, ref_acc, _ = calls(idx, test, "torch")
                for runtime in runtimes:
                    pred, acc, _ = (ref, ref_acc, None) if runtime == "torch" else calls(idx, test, runtime)
                    call_rows.append([preset, name, runtime, len(pred), float(np.mean(pred == ref)), acc, acc - ref_acc])
                    print(table(CALL_HEAD, call_rows[-1:]), flush=True)
    text = [
        "# Encoders on torch vs a CPU inference runtime",
        "",
        f"Command: `.venv/bin/python bench/bench_runtime.py --presets {args.presets}" + (" --loaded" if args.loaded else "")
        + (" --skip-calls" if args.skip_calls else "") + f" --stream-frames {args.stream_frames} --rounds {args.rounds}`"
        + f". torch {torch.__version__} with {os.cpu_count()} threads is the baseline in the same run (BLAS at "
        f"{os.cpu_count()} threads); every runtime at float32 and {os.cpu_count()} threads, torch and BLAS beside it at one "
        f"({', '.join(f'{r} {available(r)}' for r in runtimes if r != 'torch')}).",
        "",
        f"## Speed: one 1224 x 904 frame (tiled real livedead frames, 0.7 um/px), end to end, best of 3 in each of {args.rounds} rounds",
        "",
        table(SPEED_HEAD, speed_rows),
        "",
        "`x torch`: the frame's time on torch over its time on this runtime, measured in the same run and the same load. "
        "`x v1 path`: the same for the v1 path (torch eager and the segmenter before the speed work: the CPU path as the "
        "issue measured it). "
        "`other procs`: cores the machine's other processes kept busy meanwhile (0 = quiet); the load average (1 min) "
        "is in the last column.",
    ]
    if stream_rows:
        text += [
            "",
            f"## Sustained: a backlog of {args.stream_frames} such frames through the service's schedule "
            f"(calls of `frames_per_call`, the next call's first frame segmented ahead), best of {args.rounds} rounds",
            "",
            table(STREAM_HEAD, stream_rows),
            "",
            "`x torch (stream)`: torch's s/frame in the same backlog over this runtime's. `x torch (best)`: torch's best "
            "figure of the run (its single frame or its backlog, whichever is faster) over this runtime's backlog. "
            "`same calls`: the share of the backlog's cells whose state is torch's. `other procs`: cores the machine's "
            "other processes kept busy during the backlog (0 = quiet); the load average (1 min) counts this bench's own threads.",
            "",
            "Which figure reaches 2x its torch baseline (measured in this run):",
            "",
            *verdict(speed_rows, stream_rows),
        ]
    if call_rows:
        text += ["", "## Same calls (EWC-FAISS on each runtime's vectors; the index built once)", "", table(CALL_HEAD, call_rows)]
    emit(text, args.write)
    return 0


SPEED_HEAD = ["preset", "added load", "runtime", "cells", "s/frame", "cells/s", "x torch", "x v1 path", "segment s", "embed s", "other procs, cores", "load avg"]
STREAM_HEAD = ["preset", "added load", "runtime", "frames", "cells", "s/frame", "cells/s", "x torch (stream)", "x torch (best)",
               "same calls", "other procs, cores", "load avg"]
CALL_HEAD = ["preset", "test set", "runtime", "cells", "same call as torch", "macro accuracy", "- torch"]

if __name__ == "__main__":
    raise SystemExit(main())
