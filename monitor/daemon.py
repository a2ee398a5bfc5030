"""The long-running service: watch, read, assemble, process, record.

A missing watch folder is exit 69 (EX_UNAVAILABLE, restarted by systemd: the
share may not be mounted yet), never silently created.

Start-up order (:func:`build_service` then :meth:`Service.run`): config,
plugins, models and index (encoders checked against the index), one warm-up
inference, metrics server, backlog scan against the ledger, watcher, then
``READY=1`` to systemd. Configuration, plugin and index errors are fatal at
start-up (exit 78). Per-frame errors are logged in one line, counted by stage
and the frame is quarantined (recorded in the ledger and in
``<state_dir>/quarantine.csv``; the instrument's files are never moved or
modified). The CSV sink is the record of truth: if it fails the frame is not
marked done and is processed again at the next start (any sink with
``record_of_truth = True`` has that role); a failure of any other sink
(Prometheus) is logged and counted, never fatal.

One worker thread does all reading and processing; watchdog threads only
enqueue. The worker stops on a ``threading.Event``; signal handlers only set
it.
"""

from __future__ import annotations

import csv
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from monitor import systemd
from monitor.assemble import FrameAssembler
from monitor.config import Config
from monitor.errors import BadInput, NotReady, Unavailable
from monitor.ledger import Ledger
from monitor.metrics import ServiceMetrics
from monitor.pipeline import Pipeline, process_frame
from monitor.protocols import Classifier, Sink
from monitor.reading import ReaderSet
from monitor.records import Counts, Frame
from monitor.watch import FileTracker, scan, start_observer

log = logging.getLogger(__name__)


@dataclass
class Service:
    cfg: Config
    readers: ReaderSet
    pipeline: Pipeline
    sinks: Sequence[Sink]
    metrics: ServiceMetrics
    ledger: Ledger
    on_counts: Callable[[Counts], None] | None = None
    tick_s: float = 0.2
    rescan_s: float = 30.0
    _queue: queue.Queue[Path] = field(default_factory=queue.Queue)
    counted: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        a = self.cfg.assembly
        self.assembler = FrameAssembler(a.channels, a.primary, a.control, a.wait_s)
        s = self.cfg.service
        self.tracker = FileTracker(s.stable_s, s.ready_deadline_s)
        self.quarantine_csv = s.state_dir / "quarantine.csv"

    # ---- intake --------------------------------------------------------
    def _see(self, p: Path) -> bool:
        """Track a file unless the ledger finished it with its current size and mtime;
        True when it was not tracked before."""
        new = p not in self.tracker
        if not new or not self.ledger.is_known(p):
            self.tracker.see(p)
            return new
        return False

    def backlog(self) -> int:
        """Queue every file in the watch folder that the ledger has not finished."""
        s = self.cfg.service
        return sum(self._see(p) for p in scan(s.watch_dir, s.patterns, s.recursive))

    def idle(self) -> bool:
        return self._queue.empty() and len(self.tracker) == 0 and self.assembler.n_pending == 0

    # ---- the loop --------------------------------------------------------
    def run(self, stop: threading.Event, until_idle: bool = False, observe: bool = True) -> None:
        """Serve until ``stop`` is set (or, with ``until_idle``, until nothing is left to do)."""
        s = self.cfg.service
        check_watch_dir(s.watch_dir)
        n = self.backlog()
        if n:
            log.info("backlog: %d file(s) in %s not yet processed", n, s.watch_dir)
        observer = start_observer(s.watch_dir, self._queue, s.patterns, s.polling, s.poll_interval_s, s.recursive) if observe else None
        log.info("watching %s (%s)", s.watch_dir, "polling" if s.polling else "native events")
        systemd.notify("READY=1\nSTATUS=watching " + str(s.watch_dir))
        last_scan = time.monotonic()
        try:
            while not stop.is_set():
                self.step()
                if time.monotonic() - last_scan > self.rescan_s:
                    self.backlog()  # backs up observers that miss events (network shares)
                    last_scan = time.monotonic()
                systemd.notify("WATCHDOG=1")
                if until_idle and self.idle():
                    for frame in self.assembler.due(force=True):
                        self.handle(frame)
                    self._drain_dropped()
                    if self.idle():
                        break
                stop.wait(self.tick_s)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            systemd.notify("STOPPING=1")

    def step(self) -> None:
        """One pass: take queued events, read stable files, process complete or overdue frames."""
        while True:
            try:
                self._see(self._queue.get_nowait())
            except queue.Empty:
                break
        for p in self.tracker.ready():
            self._read(p)
        for frame in self.assembler.due():
            self.metrics.frames.labels("incomplete").inc()
            self.handle(frame)
        self._drain_dropped()
        self.metrics.queue_depth.labels("files").set(len(self.tracker))
        self.metrics.queue_depth.labels("frames_waiting_for_channels").set(self.assembler.n_pending)

    def _drain_dropped(self) -> None:
        """Frames the assembler gave up on (no primary channel; a channel after its frame)."""
        for d in self.assembler.take_dropped():
            self.metrics.frames.labels("dropped").inc()
            self._quarantine(list(d.sources), "assemble", d.reason)

    def _read(self, p: Path) -> None:
        try:
            reader = self.readers.choose(p)
            acq = reader.read(p)
        except NotReady as e:
            if self.tracker.failed(p):
                self._quarantine([p], "read", f"still unreadable after {self.cfg.service.ready_deadline_s:.0f}s: {e.problem}")
            else:
                log.debug("not ready, will retry: %s", e)
            return
        except BadInput as e:
            self.tracker.done(p)
            self._quarantine([p], "read", e.problem)
            return
        except Exception as e:  # a reader plugin bug must not stop the service
            self.tracker.done(p)
            self._quarantine([p], "read", f"{type(e).__name__}: {e}")
            return
        self.tracker.done(p)
        self.metrics.files.labels("read").inc()
        if self.ledger.frame_done(acq.key):
            log.info("%s: frame %s already recorded; ignoring this file", p, acq.key)
            self.ledger.mark_files([p], "done", acq.key)
            return
        self.ledger.mark_files([p], "read", acq.key)
        frame = self.assembler.add(acq)
        if frame is not None:
            self.handle(frame)

    def handle(self, frame: Frame) -> Counts | None:
        """Process one frame and hand the counts to every sink."""
        try:
            counts = process_frame(frame, self.pipeline)
        except Exception as e:
            stage = getattr(e, "stage", "process")
            self.metrics.errors.labels(stage).inc()
            self._quarantine(list(frame.sources), stage, f"{type(e).__name__}: {e}", frame)
            return None
        recorded = True
        for sink in self.sinks:
            try:
                sink.write(counts)
            except Exception as e:
                name = getattr(sink, "name", type(sink).__name__)
                self.metrics.errors.labels(f"sink_{name}").inc()
                log.error("%s: sink %s failed: %s: %s", frame.key, name, type(e).__name__, e)
                if getattr(sink, "record_of_truth", False):
                    recorded = False
        if not recorded:
            self.metrics.frames.labels("unrecorded").inc()
            return counts  # not marked done: it is processed again at the next start
        self.ledger.mark_frame(frame.key, frame.sources, "done")
        self.metrics.observe_frame(counts)
        self.counted += 1
        log.info(
            "%s: %d cells %s%s",
            frame.key,
            counts.n_cells,
            " ".join(f"{k}={v}" for k, v in counts.counts.items()),
            f" control={counts.control.area_fraction:.3f}" if counts.control else "",
        )
        if self.on_counts is not None:
            self.on_counts(counts)
        return counts

    def _quarantine(self, paths: list[Path], stage: str, problem: str, frame: Frame | None = None) -> None:
        self.failed += 1
        self.metrics.files.labels("quarantined").inc(len(paths))
        if frame is not None:
            self.metrics.frames.labels("failed").inc()
            self.ledger.mark_frame(frame.key, paths, "failed", problem)
        else:
            self.ledger.mark_files(paths, "quarantined", None, problem)
        for p in paths:
            log.error("%s: %s (stage %s; quarantined)", p, problem, stage)
        new = not self.quarantine_csv.exists()
        self.quarantine_csv.parent.mkdir(parents=True, exist_ok=True)
        with self.quarantine_csv.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["time", "path", "stage", "problem"])
            now = datetime.now(UTC).isoformat(timespec="seconds")
            for p in paths:
                w.writerow([now, str(p), stage, problem])

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                log.warning("sink %s did not close cleanly: %s", getattr(sink, "name", sink), e)
        self.ledger.close()


def check_watch_dir(path: Path) -> None:
    """The watch folder must exist; it is never created (an unmounted share would be
    silently replaced by an empty local folder): :class:`Unavailable`, exit 69, retried."""
    if not path.is_dir():
        raise Unavailable(f"service.watch_dir {path}: no such folder (is the export share mounted?)")


def resolve_device(want: str) -> str:
    """``auto``: CUDA when torch sees a GPU, else CPU (every feature works without a GPU)."""
    if want == "cpu":
        return "cpu"
    try:
        import torch

        ok = torch.cuda.is_available()
    except Exception:
        ok = False
    if want == "cuda" and not ok:
        log.warning("pipeline.device = cuda but no usable GPU; falling back to CPU")
    return "cuda" if ok else "cpu"


def build_pipeline(cfg: Config, registry: Any, ctx: Any, classifier: Classifier | None = None) -> Pipeline:
    """Segmenter, encoders, index and classifier from the config; all errors fatal.

    With ``classifier`` given, no index is loaded (the demo and benches use
    this to embed reference cells through the service's own components).
    """
    src = cfg.source_name
    segmenter = registry.build("segmenters", cfg.segmenter, ctx, src, "segmenter")
    encoders = [registry.build("encoders", ref, ctx, src, f"encoders.{i}") for i, ref in enumerate(cfg.encoders)]
    p = cfg.pipeline
    if classifier is None:
        from monitor.index import EWCClassifier, ReferenceIndex, params_from_config

        index = ReferenceIndex.load(cfg.classifier.index, [{"id": e.id, "dim": e.dim} for e in encoders])
        c = cfg.classifier
        params = params_from_config(index, c.k_min, c.k_max, c.entropy_threshold, c.reweight)
        classifier = EWCClassifier(index, params, p.certainty_floor)
    return Pipeline(
        segmenter=segmenter,
        encoders=encoders,
        classifier=classifier,
        pixel_size_um=p.pixel_size_um,
        crop_px=p.crop_px,
        blank_background=p.blank_background,
        batch_size=p.batch_size,
        control_enabled=cfg.control.enabled,
        control_min_region_px=cfg.control.min_region_px,
        control_min_snr=cfg.control.min_snr,
    )


def warm_up(pipeline: Pipeline) -> float:
    """One inference through every encoder and the classifier, so the first frame is not slow."""
    from monitor.pipeline import embed

    t = time.perf_counter()
    crop = np.full((1, pipeline.crop_px, pipeline.crop_px, 3), 128, np.uint8)
    pipeline.classifier.classify(embed(crop, pipeline.encoders, 1))
    return time.perf_counter() - t


def build_service(cfg: Config, registry: Any, metrics_registry: Any = None, serve_metrics: bool = True) -> tuple[Service, Any]:
    """Everything the service needs, in start-up order; returns (service, metrics http server or None)."""
    from prometheus_client import CollectorRegistry

    from monitor import __version__
    from monitor.metrics import serve
    from monitor.protocols import BuildContext
    from monitor.reading import build_readers

    s = cfg.service
    check_watch_dir(s.watch_dir)  # before the (slow) model and index loading
    s.state_dir.mkdir(parents=True, exist_ok=True)
    metrics = ServiceMetrics(metrics_registry or CollectorRegistry(), __version__)
    device = resolve_device(cfg.pipeline.device)
    ctx = BuildContext(state_dir=s.state_dir, config_path=cfg.source, metrics=metrics, device=device, extra={"experiment": s.experiment})
    readers = build_readers(cfg, registry, ctx)
    t = time.perf_counter()
    pipeline = build_pipeline(cfg, registry, ctx)
    log.info("models and index loaded in %.1fs (device %s); warm-up %.2fs", time.perf_counter() - t, device, warm_up(pipeline))
    src = cfg.source_name
    sinks = [registry.build("sinks", ref, ctx, src, f"sinks.{i}") for i, ref in enumerate(cfg.sinks)]
    server = None
    if serve_metrics and s.metrics_port:
        try:
            server = serve(metrics.registry, s.metrics_port, s.metrics_addr)
            log.info("metrics at http://%s:%d/metrics", s.metrics_addr, s.metrics_port)
        except OSError as e:  # Prometheus is not the record of truth
            log.error("metrics server could not start on %s:%d (%s); continuing without /metrics", s.metrics_addr, s.metrics_port, e)
    ledger = Ledger(s.state_dir / "ledger.sqlite")
    return Service(cfg, readers, pipeline, sinks, metrics, ledger), server


def stop_server(server: Any) -> None:
    if server is None:
        return
    httpd = server[0] if isinstance(server, tuple) else server
    try:
        httpd.shutdown()
        httpd.server_close()
    except Exception:  # pragma: no cover
        pass
