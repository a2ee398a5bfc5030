"""The long-running service: watch, read, assemble, process, record.

A missing watch folder is exit 69 (EX_UNAVAILABLE, restarted by systemd: the
share may not be mounted yet), never silently created.

Start-up order (:func:`build_service` then :meth:`Service.run`): config,
watch folder, the state-folder lock (a second instance exits 69 naming the
holder's pid), plugins, models and index (encoders checked against the
index), one warm-up inference, metrics server (a port that cannot be bound
is fatal: READY=1 is never sent), gauges restored from the record of truth,
frames a previous run left in flight, backlog scan against the ledger,
watcher, then ``READY=1`` to systemd. Configuration, plugin and index errors
are fatal at start-up (exit 78).

Per frame
---------
* Errors in reading, assembling channels or any pipeline stage are logged in
  one line naming the file, counted by stage, and the frame (or file) is
  quarantined (recorded in the ledger and in ``<state_dir>/quarantine.csv``;
  the instrument's files are never moved or modified). Nothing a frame does
  escapes the loop, except a failure of the record of truth.
* A file whose channels this configuration does not count is ``skipped``
  (final in the ledger, one INFO line), not decoded again at every rescan.
* A file found not ready (still being written) gets one INFO line the first
  time ("waiting up to N s"), then is retried with back-off until
  ``ready_deadline_s``.
* Before the pipeline runs, the frame is marked ``processing`` in the
  ledger. A frame a previous run left ``processing`` (it died during that
  frame: a crash, an out-of-memory kill, SIGKILL) is retried, first in line;
  found in flight at ``service.max_frame_attempts`` (3) start-ups, it is
  quarantined as having hung or crashed the worker, so no frame can stop the
  service at every restart (and a kill at a random moment costs no frame).
* A frame still processing after ``service.frame_timeout_s`` is logged in
  one ERROR line, counted (``cellmonitor_frames_total{result="over_time_limit"}``)
  and quarantined; under ``cellmonitor run`` the process then exits 75 so that
  systemd restarts it (a Python thread stuck in native code cannot be
  cancelled; ``WATCHDOG=1`` stops while a frame runs, so systemd's watchdog is
  the last resort).
* The CSV sink is the record of truth: if it (or the ledger, or anything in
  the state folder) cannot be written, the frame is not marked done and the
  service stops cleanly with one line, exit 74 (EX_IOERR); it is processed
  again after the restart. A failure of any other sink (Prometheus) is logged
  and counted, never fatal.

One worker thread does all reading and processing; watchdog threads only
enqueue. The worker stops on a ``threading.Event``; signal handlers only set
it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from monitor.config import Config, ServiceConfig
from monitor.device import resolve_device
from monitor.errors import (
    EX_TEMPFAIL,
    BadInput,
    ConfigError,
    NotReady,
    StageError,
    StateWriteError,
    Unavailable,
)
from monitor.pipeline import Pipeline, process_frames
from monitor.protocols import Classifier
from monitor.records import Counts, Frame, FrameKey
from monitor.service import notify as systemd
from monitor.service.assemble import FrameAssembler
from monitor.service.ledger import Ledger, StateLock, path_text, safe_text
from monitor.service.metrics import ServiceMetrics
from monitor.service.reading import ReaderSet
from monitor.service.recording import Recorder
from monitor.service.rows import class_roles
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
    #: exit the process (status 75) when a frame runs past frame_timeout_s (``cellmonitor run``)
    exit_on_hang: bool = False
    lock: StateLock | None = None
    #: expert corrections into the live index (monitor.service.feedback), polled between frames
    feedback: Any = None

    def __post_init__(self) -> None:
        self._current: tuple[list[Frame], float] | None = None
        self._current_lock = threading.Lock()
        self._hung: set[FrameKey] = set()
        #: frames a previous run left in flight: processed one at a time, never in a shared call,
        #: so that a frame that hangs or crashes the worker is the one blamed
        self._solo: set[str] = set()  # ledger keys (safe_text(str(key)))

    @property
    def counted(self) -> int:
        """Frames recorded since start."""
        return self.recorder.counted

    @property
    def failed(self) -> int:
        """Files and frames quarantined since start."""
        return self.recorder.failed

    def backlog(self) -> int:
        """Queue every file in the watch folder that the ledger has not finished."""
        return self.intake.backlog()

    def idle(self) -> bool:
        """Nothing queued, tracked or waiting for channels."""
        return self.intake.idle() and self.assembler.n_pending == 0

    # ---- the loop --------------------------------------------------------
    def run(self, stop: threading.Event, until_idle: bool = False, observe: bool = True) -> None:
        """Serve until ``stop`` is set (or, with ``until_idle``, until nothing is left to do)."""
        s = self.settings
        check_watch_dir(s.watch_dir)
        self.recover()
        n = self.backlog()
        if n:
            log.info("backlog: %d file(s) in %s not yet processed", n, s.watch_dir)
        observer = start_observer(s.watch_dir, self.intake.queue, s.patterns, s.polling, s.poll_interval_s, s.recursive) if observe else None
        log.info("watching %s (%s)", s.watch_dir, "polling" if s.polling else "native events")
        systemd.notify("READY=1\nSTATUS=watching " + path_text(s.watch_dir))
        last_scan = time.monotonic()
        guard_stop = threading.Event()
        guard = threading.Thread(target=self._guard, args=(guard_stop,), name="cellmonitor-frame-guard", daemon=True)
        guard.start()
        try:
            while not stop.is_set():
                self.step()
                if time.monotonic() - last_scan > self.rescan_s:
                    self.backlog()  # backs up observers that miss events (network shares)
                    last_scan = time.monotonic()
                systemd.notify("WATCHDOG=1")
                if until_idle and self.idle():
                    self.handle_all(self._due(force=True))
                    self._drain_dropped()
                    if self.idle():
                        break
                stop.wait(self.tick_s)
        finally:
            guard_stop.set()
            guard.join(timeout=5)
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            systemd.notify("STOPPING=1")

    def recover(self) -> int:
        """Frames a previous run left in flight: retry once (first in line), then quarantine.

        Returns the number quarantined.
        """
        before = self.recorder.failed
        for st in self.recorder.stale_to_retry(self.settings.max_frame_attempts):
            log.warning("%s: was being processed when the previous run stopped; processing it again, alone (attempt %d of %d)",
                        st.key, st.attempts + 1, self.settings.max_frame_attempts)
            self._solo.add(st.key)
            for p in st.paths:
                self.intake.see(Path(p))
        return self.recorder.failed - before

    def _guard(self, stop: threading.Event) -> None:
        """Watch the call in progress; act once when it runs past ``frame_timeout_s`` per frame.

        One frame: it is quarantined (``hung``). Several frames sharing encoder
        calls: which one hangs cannot be told, so none is blamed; they stay in
        flight in the ledger and the restarted service processes each alone
        (:meth:`recover`), where the guard names the one that hangs.
        """
        limit = self.settings.frame_timeout_s
        while not stop.wait(min(1.0, max(0.01, limit / 10))):
            with self._current_lock:
                cur = self._current
            if cur is None:
                continue
            frames, t0 = cur
            took = time.monotonic() - t0
            if took < limit * len(frames) or frames[0].key in self._hung:
                continue
            self._hung.add(frames[0].key)
            self.metrics.frames.labels("over_time_limit").inc()
            if len(frames) == 1:
                frame = frames[0]
                self.recorder.quarantine(list(frame.sources), "process",
                                         f"still processing after {took:.0f}s (service.frame_timeout_s = {limit:g})", frame.key, status="hung")
            else:
                log.error("frames %s, processed together, still processing after %.1fs (service.frame_timeout_s = %g each); %s",
                          ", ".join(str(f.key) for f in frames), took, limit,
                          "each is processed alone after the restart" if self.exit_on_hang else "none is blamed")
            if self.exit_on_hang:
                log.critical("exiting (status %d) so that the service restarts without the stuck frame", EX_TEMPFAIL)
                for h in logging.getLogger().handlers:
                    h.flush()
                os._exit(EX_TEMPFAIL)

    def step(self) -> None:
        """One pass: take queued events, read stable files, process complete or overdue frames.

        The frames that became due in this pass are processed together
        (:meth:`handle_all`), so a backlog shares encoder calls; a frame never
        waits for others to arrive.
        """
        ready = [f for f in map(self._read, self.intake.collect()) if f is not None]
        for frame in self._due():
            self.metrics.frames.labels("incomplete").inc()
            ready.append(frame)
        self.handle_all(ready)
        self._drain_dropped()
        if self.feedback is not None:
            try:
                self.feedback.maybe_poll()
            except StateWriteError:
                raise
            except Exception as e:  # corrections must never stop the counting
                log.warning("feedback %s: %s: %s", self.feedback.folder, type(e).__name__, e)
        self.metrics.queue_depth.labels("files").set(len(self.intake.tracker))
        self.metrics.queue_depth.labels("frames_waiting_for_channels").set(self.assembler.n_pending)

    def _due(self, force: bool = False) -> list[Frame]:
        """Overdue frames; an error while assembling one never escapes the loop.

        The assembler releases overdue frames in one call, so when resampling
        one of them fails, every file that left the waiting list in that call
        is quarantined (the frames released beside it cannot be told apart).
        """
        before = set(self.assembler.pending_paths())
        try:
            return self.assembler.due(force)
        except Exception as e:
            lost = sorted(before - set(self.assembler.pending_paths()))
            self.metrics.errors.labels("assemble").inc()
            self.recorder.quarantine(lost, "assemble", f"channels could not be assembled: {type(e).__name__}: {e}")
            return []

    def _drain_dropped(self) -> None:
        """Frames the assembler gave up on (no primary channel; a channel after its frame)."""
        for d in self.assembler.take_dropped():
            self.metrics.frames.labels("dropped").inc()
            self.recorder.quarantine(list(d.sources), "assemble", d.reason)

    def _read(self, p: Path) -> Frame | None:
        """Read one stable file; the frame it completes, if any (not yet processed)."""
        tracker = self.intake.tracker
        try:
            reader = self.readers.choose(p)
            acq = reader.read(p)
        except NotReady as e:
            first = tracker.attempts(p) == 0
            if tracker.failed(p):
                self.recorder.quarantine([p], "read", f"still unreadable after {self.settings.ready_deadline_s:.0f}s: {e.problem}")
            elif first:
                log.info("%s: not ready (%s); waiting up to %.0f s for it to be complete",
                         path_text(p), e.problem, self.settings.ready_deadline_s)
            else:
                log.debug("not ready, will retry: %s", path_text(p))
            return None
        except BadInput as e:
            tracker.done(p)
            self.recorder.quarantine([p], "read", e.problem)
            return None
        except Exception as e:  # a reader plugin bug must not stop the service
            tracker.done(p)
            self.recorder.quarantine([p], "read", f"{type(e).__name__}: {e}")
            return None
        tracker.done(p)
        if not self.recorder.note_read(p, acq.key):
            return None
        ignored = self.assembler.stats["ignored_files"]
        pending = set(self.assembler.pending_paths())
        try:
            frame = self.assembler.add(acq)
        except Exception as e:  # resampling a channel (e.g. a huge declared size) must not stop the loop
            lost = [x for x in pending if x not in set(self.assembler.pending_paths())]
            self.metrics.errors.labels("assemble").inc()
            self.recorder.quarantine([p, *lost], "assemble", f"channels could not be assembled: {type(e).__name__}: {e}", acq.key)
            return None
        if self.assembler.stats["ignored_files"] > ignored:
            names = ", ".join(repr(c) for c in acq.channels)
            self.recorder.skip(p, f"channel {names} is not in assembly.channels", acq.key)
            return None
        return frame

    def handle_all(self, frames: Sequence[Frame]) -> None:
        """Process frames that are due now, up to ``pipeline.frames_per_call`` per shared call.

        Frames a previous run left in flight are processed alone. Every frame
        of a call is marked ``processing`` before it starts; each is recorded
        (or quarantined) on its own, exactly as if it had been processed alone.
        """
        solo = [f for f in frames if safe_text(str(f.key)) in self._solo]
        rest = [f for f in frames if safe_text(str(f.key)) not in self._solo]
        self._solo.difference_update(safe_text(str(f.key)) for f in solo)
        n = max(1, self.pipeline.frames_per_call)
        for call in [[f] for f in solo] + [rest[i : i + n] for i in range(0, len(rest), n)]:
            for j, (f, r) in enumerate(zip(call, self._process(call), strict=True)):
                try:
                    self._record(f, r)
                except StateWriteError:
                    for later in call[j + 1 :]:
                        self.recorder.ledger.release_processing(later.key)
                    raise

    def _process(self, frames: list[Frame]) -> list[Counts | StageError]:
        """One pipeline call under the frame guard; every frame marked ``processing`` first."""
        for f in frames:
            self.recorder.ledger.mark_processing(f.key, f.sources)
        with self._current_lock:
            self._current = (frames, time.monotonic())
        try:
            return process_frames(frames, self.pipeline)
        except Exception as e:  # process_frames isolates frames and stages; this is a last resort, never a stop
            return [StageError("process", e)] * len(frames)
        finally:
            with self._current_lock:
                self._current = None

    def _record(self, frame: Frame, result: Counts | StageError) -> Counts | None:
        """Record one frame's counts, or quarantine it for its failed stage.

        A failure to write the record of truth (:class:`StateWriteError`)
        propagates and stops the service without using one of the frame's
        attempts.
        """
        if isinstance(result, StageError):
            self.metrics.errors.labels(result.stage).inc()
            self.recorder.quarantine(list(frame.sources), result.stage, f"{type(result.cause).__name__}: {result.cause}", frame.key)
            return None
        try:
            recorded = self.recorder.record(frame, result)
        except StateWriteError:
            self.recorder.ledger.release_processing(frame.key)  # not the frame's fault: no attempt used
            raise
        if recorded and self.on_counts is not None:
            self.on_counts(result)
        return result

    def close(self) -> None:
        """Close sinks and ledger, release the state-folder lock."""
        self.recorder.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def check_watch_dir(path: Path) -> None:
    """The watch folder must exist; it is never created (an unmounted share would be
    silently replaced by an empty local folder): :class:`Unavailable`, exit 69, retried."""
    if not path.is_dir():
        raise Unavailable(f"service.watch_dir {path}: no such folder (is the export share mounted?)")


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
        from monitor.index.query import query_pipeline
        from monitor.index.store import ReferenceIndex

        index = ReferenceIndex.load(cfg.classifier.index, [{"id": e.id, "dim": e.dim} for e in encoders])
        c = cfg.classifier
        params = params_from_config(index, c.k_min, c.k_max, c.entropy_threshold, c.reweight)
        classifier = EWCClassifier(index, params, p.certainty_floor, flag_unknown=c.unknown)
        if c.unknown and index.unknown_distance is None:
            log.info("%s: no unknown-cell calibration (an index built before it); rebuild it to count unknown cells", cfg.classifier.index)
        pipe = Pipeline.from_config(cfg, segmenter, encoders, classifier)
        if cfg.marker.rules and cfg.marker.agreement:
            pipe = replace(pipe, marker=marker_check(cfg, index))
        # the index's query side (TTA encoders, crop framing), as classify and evaluate apply it
        return query_pipeline(pipe, index)
    return Pipeline.from_config(cfg, segmenter, encoders, classifier)


class _NoIndex:
    """Stand-in classifier while a reference index is being built (never classifies)."""

    classes: tuple[str, ...] = ()

    def classify(self, emb: Any) -> Any:
        raise RuntimeError("reference index not built yet")


def pipeline_without_index(cfg: Config, registry: Any, ctx: Any) -> Pipeline:
    """The service's segmenter, encoders and crop settings, before any index exists
    (to embed reference cells through the service's own components)."""
    return build_pipeline(cfg, registry, ctx, classifier=_NoIndex())


def feedback_for(cfg: Config, readers: ReaderSet, pipeline: Pipeline, metrics: ServiceMetrics) -> Any:
    """The feedback folder's poller, or None when off (or the classifier has no index to add to)."""
    from monitor.service.feedback import Feedback

    s = cfg.service
    index = getattr(pipeline.classifier, "index", None)
    if not s.feedback or index is None:
        return None
    folder = s.feedback_dir or s.state_dir / "feedback"
    folder.mkdir(parents=True, exist_ok=True)
    metrics.index_version.set(index.version)
    log.info("expert corrections: drop them into %s (index version %d, %d correction(s) so far)", folder, index.version, index.n_corrections)
    return Feedback(folder, cfg.classifier.index, pipeline, readers, s.watch_dir, metrics, cfg.assembly.primary, s.stable_s, s.poll_interval_s)


def marker_check(cfg: Config, index: Any) -> Any:
    """Live marker agreement from ``[marker]``; an ``"otsu"`` threshold takes the number fitted
    when the index was built ``--from-marker`` (recorded in its preprocessing)."""
    from monitor.marker import MarkerCheck, resolve

    fitted = {(r["channel"], r["state"]): r["threshold"] for r in ((index.preprocessing or {}).get("marker") or {}).get("rules", [])}
    table = cfg.marker.model_dump()
    for r in table["rules"]:
        if r["threshold"] == "otsu":
            if (r["channel"], r["state"]) not in fitted:
                raise ConfigError(f"{cfg.source_name}: marker rule {r['channel']} -> {r['state']}: threshold 'otsu' is fitted by "
                                  f"'index build --from-marker', and index {cfg.classifier.index} was not; give a number")
            r["threshold"] = fitted[(r["channel"], r["state"])]
    rules = resolve(table)
    log.info("marker agreement: %s; else %s", "; ".join(f"{r.channel} > {r.threshold:.3g} -> {r.state}" for r in rules.rules), rules.negative)
    return MarkerCheck(rules, class_roles(index.classes, cfg.classifier.roles))


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
    lock = StateLock(s.state_dir)  # a second instance stops here, before loading anything
    try:
        metrics = ServiceMetrics(metrics_registry or CollectorRegistry(), __version__)
        device = resolve_device(cfg.pipeline.device)
        ctx = BuildContext(state_dir=s.state_dir, config_path=cfg.path, metrics=metrics, device=device, extra={"experiment": s.experiment})
        readers = build_readers(cfg, registry, ctx)
        t = time.perf_counter()
        pipeline = build_pipeline(cfg, registry, ctx)
        log.info("models and index loaded in %.1fs (device %s); warm-up %.2fs", time.perf_counter() - t, device, warm_up(pipeline))
        roles = roles_for(cfg, pipeline.classifier.classes)
        metrics.roles = roles
        ctx.extra["roles"] = roles
        src = cfg.source_name
        sinks = [registry.build("sinks", ref, ctx, src, f"sinks.{i}") for i, ref in enumerate(cfg.sinks)]
        if any(getattr(s, "wants_calls", False) for s in sinks):  # e.g. the overlay sink
            pipeline = replace(pipeline, keep_calls=True)
        server = None
        if serve_metrics and s.metrics_port:
            server = serve(metrics.registry, s.metrics_port, s.metrics_addr)  # fatal when it cannot bind
            log.info("metrics at http://%s:%d/metrics", s.metrics_addr, s.metrics_port)
        try:
            svc = assemble_service(cfg, readers, pipeline, sinks, metrics, lock=lock)
            svc.feedback = feedback_for(cfg, readers, pipeline, metrics)
        except BaseException:
            stop_server(server)
            raise
    except BaseException:
        lock.release()
        raise
    return svc, server


def roles_for(cfg: Config, classes: Sequence[str]) -> dict[str, str]:
    """Canonical state of each reference class; a configured class the index lacks is a config error."""

    known = {c.casefold() for c in classes}
    unknown = [k for k in cfg.classifier.roles if k.casefold() not in known]
    if unknown:
        raise ConfigError(f"{cfg.source_name}: classifier.roles: {', '.join(map(repr, unknown))} not a class of the index (classes: {', '.join(classes)})")
    roles = class_roles(classes, cfg.classifier.roles)
    log.info("class roles: %s", ", ".join(f"{c} -> {r}" for c, r in roles.items()))
    return roles


def assemble_service(cfg: Config, readers: ReaderSet, pipeline: Pipeline, sinks: Sequence[Any], metrics: ServiceMetrics, **kw: Any) -> Service:
    """Wire a :class:`Service` from its parts: ledger, intake, assembler and recorder from ``cfg``."""
    s, a = cfg.service, cfg.assembly
    lock = kw.pop("lock", None) or StateLock(s.state_dir)
    try:
        ledger = Ledger(s.state_dir / "ledger.sqlite")
        intake = Intake(FileTracker(s.stable_s, s.ready_deadline_s), ledger, s.watch_dir, s.patterns, s.recursive)
        assembler = FrameAssembler(a.channels, a.primary, a.control, a.wait_s)
        roles = metrics.roles if metrics.roles is not None else class_roles(pipeline.classifier.classes, cfg.classifier.roles)
        metrics.roles = roles
        recorder = Recorder(sinks, ledger, metrics, s.state_dir / "quarantine.csv", roles)
        for sink in sinks:  # the dashboard shows every well's last state straight after a restart
            if getattr(sink, "record_of_truth", False) and isinstance(getattr(sink, "path", None), Path):
                n = metrics.restore(sink.path)
                if n:
                    log.info("gauges of %d well(s) restored from %s", n, sink.path)
    except BaseException:
        lock.release()
        raise
    return Service(s, readers, pipeline, assembler, intake, recorder, metrics, lock=lock, **kw)


def stop_server(server: Any) -> None:
    """Stop the metrics HTTP server (None: nothing to do)."""
    if server is None:
        return
    httpd = server[0] if isinstance(server, tuple) else server
    try:
        httpd.shutdown()
        httpd.server_close()
    except Exception:  # pragma: no cover
        pass
