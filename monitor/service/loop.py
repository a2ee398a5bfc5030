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

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.config import Config, ServiceConfig
from monitor.errors import BadInput, NotReady, StageError, Unavailable
from monitor.pipeline import Pipeline, process_frame
from monitor.protocols import Classifier
from monitor.records import Counts, Frame
from monitor.service import notify as systemd
from monitor.service.assemble import FrameAssembler
from monitor.service.ledger import Ledger
from monitor.service.metrics import ServiceMetrics
from monitor.service.reading import ReaderSet
from monitor.service.recording import Recorder
from monitor.service.watch import FileTracker, Intake, start_observer

log = logging.getLogger(__name__)


@dataclass
class Service:
    """The worker loop: intake -> read -> assemble -> process -> record.

    Each collaborator does one job and is injected (:func:`build_service`
    wires the real ones; tests wire fakes): ``intake`` admits stable files,
    ``readers`` decode them, ``assembler`` groups channels into frames,
    ``pipeline`` turns a frame into counts, ``recorder`` writes sinks, the
    ledger and the quarantine.
    """

    settings: ServiceConfig
    readers: ReaderSet
    pipeline: Pipeline
    assembler: FrameAssembler
    intake: Intake
    recorder: Recorder
    metrics: ServiceMetrics
    on_counts: Callable[[Counts], None] | None = None
    tick_s: float = 0.2
    rescan_s: float = 30.0

    @property
    def counted(self) -> int:
        return self.recorder.counted

    @property
    def failed(self) -> int:
        return self.recorder.failed

    def backlog(self) -> int:
        """Queue every file in the watch folder that the ledger has not finished."""
        return self.intake.backlog()

    def idle(self) -> bool:
        return self.intake.idle() and self.assembler.n_pending == 0

    # ---- the loop --------------------------------------------------------
    def run(self, stop: threading.Event, until_idle: bool = False, observe: bool = True) -> None:
        """Serve until ``stop`` is set (or, with ``until_idle``, until nothing is left to do)."""
        s = self.settings
        check_watch_dir(s.watch_dir)
        n = self.backlog()
        if n:
            log.info("backlog: %d file(s) in %s not yet processed", n, s.watch_dir)
        observer = start_observer(s.watch_dir, self.intake.queue, s.patterns, s.polling, s.poll_interval_s, s.recursive) if observe else None
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
        for p in self.intake.collect():
            self._read(p)
        for frame in self.assembler.due():
            self.metrics.frames.labels("incomplete").inc()
            self.handle(frame)
        self._drain_dropped()
        self.metrics.queue_depth.labels("files").set(len(self.intake.tracker))
        self.metrics.queue_depth.labels("frames_waiting_for_channels").set(self.assembler.n_pending)

    def _drain_dropped(self) -> None:
        """Frames the assembler gave up on (no primary channel; a channel after its frame)."""
        for d in self.assembler.take_dropped():
            self.metrics.frames.labels("dropped").inc()
            self.recorder.quarantine(list(d.sources), "assemble", d.reason)

    def _read(self, p: Path) -> None:
        tracker, ledger = self.intake.tracker, self.recorder.ledger
        try:
            reader = self.readers.choose(p)
            acq = reader.read(p)
        except NotReady as e:
            if tracker.failed(p):
                self.recorder.quarantine([p], "read", f"still unreadable after {self.settings.ready_deadline_s:.0f}s: {e.problem}")
            else:
                log.debug("not ready, will retry: %s", e)
            return
        except BadInput as e:
            tracker.done(p)
            self.recorder.quarantine([p], "read", e.problem)
            return
        except Exception as e:  # a reader plugin bug must not stop the service
            tracker.done(p)
            self.recorder.quarantine([p], "read", f"{type(e).__name__}: {e}")
            return
        tracker.done(p)
        self.metrics.files.labels("read").inc()
        if ledger.frame_done(acq.key):
            log.info("%s: frame %s already recorded; ignoring this file", p, acq.key)
            ledger.mark_files([p], "done", acq.key)
            return
        ledger.mark_files([p], "read", acq.key)
        frame = self.assembler.add(acq)
        if frame is not None:
            self.handle(frame)

    def handle(self, frame: Frame) -> Counts | None:
        """Process one frame and record it; a failing stage quarantines the frame."""
        try:
            counts = process_frame(frame, self.pipeline)
        except StageError as e:
            self.metrics.errors.labels(e.stage).inc()
            self.recorder.quarantine(list(frame.sources), e.stage, f"{type(e.cause).__name__}: {e.cause}", frame.key)
            return None
        if self.recorder.record(frame, counts) and self.on_counts is not None:
            self.on_counts(counts)
        return counts

    def close(self) -> None:
        self.recorder.close()


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
        from monitor.index.ewc import EWCClassifier, params_from_config
        from monitor.index.store import ReferenceIndex

        index = ReferenceIndex.load(cfg.classifier.index, [{"id": e.id, "dim": e.dim} for e in encoders])
        c = cfg.classifier
        params = params_from_config(index, c.k_min, c.k_max, c.entropy_threshold, c.reweight)
        classifier = EWCClassifier(index, params, p.certainty_floor)
    return Pipeline.from_config(cfg, segmenter, encoders, classifier)


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
    from monitor.protocols import BuildContext
    from monitor.service.metrics import serve
    from monitor.service.reading import build_readers

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
    return assemble_service(cfg, readers, pipeline, sinks, metrics), server


def assemble_service(cfg: Config, readers: ReaderSet, pipeline: Pipeline, sinks: Sequence[Any], metrics: ServiceMetrics, **kw: Any) -> Service:
    """Wire a :class:`Service` from its parts: ledger, intake, assembler and recorder from ``cfg``."""
    s, a = cfg.service, cfg.assembly
    ledger = Ledger(s.state_dir / "ledger.sqlite")
    intake = Intake(FileTracker(s.stable_s, s.ready_deadline_s), ledger, s.watch_dir, s.patterns, s.recursive)
    assembler = FrameAssembler(a.channels, a.primary, a.control, a.wait_s)
    recorder = Recorder(sinks, ledger, metrics, s.state_dir / "quarantine.csv")
    return Service(s, readers, pipeline, assembler, intake, recorder, metrics, **kw)


def stop_server(server: Any) -> None:
    if server is None:
        return
    httpd = server[0] if isinstance(server, tuple) else server
    try:
        httpd.shutdown()
        httpd.server_close()
    except Exception:  # pragma: no cover
        pass
