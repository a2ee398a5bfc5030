"""The long-running service: watch, read, assemble, process, record.

A missing watch folder is exit 69 (EX_UNAVAILABLE, restarted by systemd: the
share may not be mounted yet), never silently created.

Start-up: :func:`monitor.service.wiring.build_service` builds everything in
start-up order; :meth:`Service.run` then takes the frames a previous run left
in flight, scans the backlog against the ledger, starts the watcher and
tells systemd ``READY=1``. Files are admitted, read, retried and grouped into
frames by :mod:`monitor.intake`, whose typed outcomes the recorder applies
(:meth:`~monitor.service.recording.Recorder.apply`), exactly as the Ray
driver does.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.config import ServiceConfig
from monitor.errors import (
    EX_TEMPFAIL,
    StageError,
    StateWriteError,
)
from monitor.intake.assemble import FrameAssembler
from monitor.intake.events import FileEvent, frame_result
from monitor.intake.files import Intake, Retry, check_watch_dir, retry_or_give_up, start_observer
from monitor.intake.ledger import StateLock, path_text, safe_text
from monitor.intake.readers import ReaderSet, read_file
from monitor.pipeline import Pipeline, SegmentAhead, process_frames
from monitor.records import Counts, Frame, FrameKey
from monitor.service import notify as systemd
from monitor.service.metrics import ServiceMetrics
from monitor.service.recording import Recorder

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where there is none (musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``); False where it cannot.

    A frame's working memory (pixels, crops, the per-field tables the cells sink smooths) is
    freed after its call, but glibc keeps freed pages in its heaps, and calls whose working
    sizes grow (a field's history, one timepoint more each hour) leave holes that later calls
    do not fit: without this the resident memory of a service running for weeks creeps up."""
    if _TRIM is None:
        return False
    _TRIM()
    return True


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
    #: the most files read in one step (0: ``8 x pipeline.frames_per_call``): a backlog (a plate that
    #: landed at once, a weekend's export) is read a few calls at a time, so memory holds a few
    #: calls' pixels, not the whole backlog's
    read_per_step: int = 0
    #: after each pass that processed frames, give the C heap's free pages back (:func:`release_free_memory`)
    trim_memory: bool = True

    def __post_init__(self) -> None:
        self._current: tuple[list[Frame], float] | None = None
        self._current_lock = threading.Lock()
        self._hung: set[FrameKey] = set()
        #: frames a previous run left in flight: processed one at a time, never in a shared call,
        #: so that a frame that hangs or crashes the worker is the one blamed
        self._solo: set[str] = set()  # ledger keys (safe_text(str(key)))
        #: frames a stage found not ready (a mask another tool has still to write), retried like a half-written file
        self._held: dict[FrameKey, tuple[Frame, Retry]] = {}

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
        return self.intake.idle() and self.assembler.n_pending == 0 and not self._held

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
                    self.handle_all(self._take(self.assembler.due(force=True)))
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
        waits for others to arrive. At most ``read_per_step`` files are read
        in a pass (oldest first), so a backlog's memory is bounded.
        """
        ready: list[Frame] = []
        stable = self.intake.collect()
        limit = self.read_per_step or 8 * max(1, self.pipeline.frames_per_call)
        for p in stable[:limit]:  # oldest first; the rest stay tracked for the next steps
            ready += self._take(self._read(p))
        if len(stable) <= limit:
            # a frame is released for a missing channel only once every file that has arrived is
            # read: its channel may be among those a capped step left for the next one
            ready += self._take(self.assembler.due())
        ready += self._due_held()
        self.handle_all(ready)
        if self.feedback is not None:
            try:
                self.feedback.maybe_poll()
            except StateWriteError:
                raise
            except Exception as e:  # corrections must never stop the counting
                log.warning("feedback %s: %s: %s", self.feedback.folder, type(e).__name__, e)
        self.metrics.queue_depth.labels("files").set(len(self.intake.tracker))
        self.metrics.queue_depth.labels("frames_waiting_for_channels").set(self.assembler.n_pending)

    def _take(self, outcomes: Sequence[Frame | FileEvent | None] | Frame | FileEvent | None) -> list[Frame]:
        """The frames among intake's outcomes; every event recorded at once (:meth:`Recorder.apply`)."""
        items = outcomes if isinstance(outcomes, list) else [outcomes]
        frames = [o for o in items if isinstance(o, Frame)]
        self.recorder.apply([o for o in items if isinstance(o, FileEvent)])
        return frames

    def _due_held(self) -> list[Frame]:
        """Frames waiting for a stage's input whose next try is due."""
        now = time.monotonic()
        due = [k for k, (_, r) in self._held.items() if r.next_try <= now]
        return [self._held[k][0] for k in due]

    def _hold(self, frame: Frame, result: StageError) -> None:
        """A stage found its input not ready (:attr:`StageError.retryable`): the frame is tried
        again with back-off, and quarantined at ``ready_deadline_s``, by the one retry policy."""
        self.recorder.ledger.release_processing(frame.key)  # not the frame's fault: no attempt used
        _, retry = self._held.get(frame.key, (frame, Retry(time.monotonic())))
        ev = FileEvent("not_ready", tuple(map(str, frame.sources)), result.problem, frame.key)
        gave_up = retry_or_give_up(ev, retry, self.settings.ready_deadline_s, time.monotonic())
        if gave_up is None:
            self._held[frame.key] = (frame, retry)
            return
        self._held.pop(frame.key, None)
        self.recorder.apply([gave_up])

    def _read(self, p: Path) -> Frame | FileEvent | None:
        """Read one stable file: the frame it completes, what became of it, or None (waiting)."""
        tracker = self.intake.tracker
        acq = read_file(self.readers, p)
        if isinstance(acq, FileEvent) and acq.kind == "not_ready":
            return tracker.not_ready(acq)  # None while retried; the "bad" event once given up
        tracker.done(p)
        if isinstance(acq, FileEvent):
            return acq
        if not self.recorder.note_read(p, acq.key):
            return None
        return self.assembler.add(acq)

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
        calls = [[f] for f in solo] + [rest[i : i + n] for i in range(0, len(rest), n)]
        # a backlog: the next call's first frame is segmented while this call embeds (solo frames,
        # which a previous run left in flight, are never started early: the guard must see them alone)
        ahead = SegmentAhead(self.pipeline) if self.pipeline.prefetch and len(calls) > 1 else None
        try:
            for k, call in enumerate(calls):
                nxt = calls[k + 1][0] if k + 1 < len(calls) else None
                if ahead is not None and nxt is not None and k + 1 >= len(solo):
                    ahead.submit(nxt)
                for j, (f, r) in enumerate(zip(call, self._process(call, ahead), strict=True)):
                    try:
                        self._record(f, r)
                    except StateWriteError:
                        for later in call[j + 1 :]:
                            self.recorder.ledger.release_processing(later.key)
                        raise
        finally:
            if ahead is not None:
                ahead.close()
            if calls and self.trim_memory:
                release_free_memory()

    def _process(self, frames: list[Frame], ahead: SegmentAhead | None = None) -> list[Counts | StageError]:
        """One pipeline call under the frame guard; every frame marked ``processing`` first."""
        for f in frames:
            self.recorder.ledger.mark_processing(f.key, f.sources)
        with self._current_lock:
            self._current = (frames, time.monotonic())
        try:
            return process_frames(frames, self.pipeline, ahead)
        except Exception as e:  # process_frames isolates frames and stages; this is a last resort, never a stop
            return [StageError("process", e)] * len(frames)
        finally:
            with self._current_lock:
                self._current = None

    def _record(self, frame: Frame, result: Counts | StageError) -> Counts | None:
        """Record one frame's counts, or quarantine it for its failed stage (:meth:`Recorder.apply`).

        A failure to write the record of truth (:class:`StateWriteError`)
        propagates and stops the service without using one of the frame's
        attempts.
        """
        if isinstance(result, StageError) and result.retryable:
            self._hold(frame, result)
            return None
        self._held.pop(frame.key, None)
        recorded = self.recorder.apply([frame_result(frame, result)])
        if recorded and self.on_counts is not None:
            self.on_counts(recorded[0])
        return recorded[0] if recorded else None

    def close(self) -> None:
        """Close sinks and ledger, release the state-folder lock."""
        self.recorder.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
