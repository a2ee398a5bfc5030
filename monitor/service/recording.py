"""Recording results: sinks, the record of truth, the ledger and the quarantine.

Policy
------
* A frame is marked done in the ledger only after every record-of-truth sink
  (``record_of_truth = True``, the CSV sink) wrote it, in the same ledger
  transaction that stores its per-timepoint counts.
* The record of truth fails safe: if a record-of-truth sink fails (disk
  full, read-only), the frame is not marked done and
  :class:`~monitor.errors.StateWriteError` stops the service cleanly (exit
  74, one line). The frame is processed again at the next start; the CSV
  sink leaves no torn line and never writes a frame twice, so nothing is
  lost or doubled. (Carrying on would leave the frame's files unfinished
  and, at the next rescan, "late" for a frame already released.)
* Any other sink (Prometheus) failing is logged and counted, never fatal.
* A file or frame that cannot become a count is quarantined: one ERROR line
  naming the file and the problem, a ledger row, a row in
  ``<state_dir>/quarantine.csv`` and a metrics counter. A file this
  configuration does not count (an unconfigured channel) is ``skipped``: one
  INFO line, a ledger row, a counter. The instrument's files are never moved
  or modified.
* Any write error in the state folder (ledger, quarantine CSV) is a
  :class:`~monitor.errors.StateWriteError` too.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from monitor.errors import CellmonitorError, StateWriteError
from monitor.intake.events import Event, FileEvent
from monitor.intake.ledger import Ledger, Stale, path_text
from monitor.protocols import Sink
from monitor.records import Counts, FrameKey
from monitor.service.metrics import ServiceMetrics
from monitor.service.rows import class_roles

log = logging.getLogger(__name__)


#: a frame with at least this share of unknown (or uncertain) cells is reported as unreliable ...
UNRELIABLE_SHARE = 0.5
#: ... when it has at least this many cells (a share of 2 or 3 cells says little)
UNRELIABLE_MIN_CELLS = 5


def unreliable(counts: Counts) -> str | None:
    """Why a frame's counts should not be trusted (half or more of its cells unknown or uncertain,
    at least :data:`UNRELIABLE_MIN_CELLS` cells), or None."""
    n = counts.n_cells
    if n < UNRELIABLE_MIN_CELLS:
        return None
    parts = [f"{k} of {n} cells {what} ({k / n:.0%})" for k, what in ((counts.n_unknown, "unknown"), (counts.n_uncertain, "uncertain"))
             if k / n >= UNRELIABLE_SHARE]
    return "; ".join(parts) or None


class Recorder:
    """Where every outcome of a frame or file goes; one instance per service."""

    def __init__(self, sinks: Sequence[Sink], ledger: Ledger, metrics: ServiceMetrics, quarantine_csv: Path,
                 roles: Mapping[str, str] | None = None):
        self.sinks = list(sinks)
        self.ledger = ledger
        self.metrics = metrics
        self.quarantine_csv = quarantine_csv
        self.roles = roles
        self.counted = 0
        self.failed = 0
        self.skipped = 0

    def apply(self, events: Sequence[Event]) -> list[Counts]:
        """Record what intake and the pipeline said about one frame's files, in order.

        The one place where an outcome becomes a ledger row, a quarantine line,
        a counter and sink writes, for the local loop and the Ray driver alike:
        ``skip`` is skipped; ``bad``, ``assemble`` and ``dropped`` are
        quarantined under their stage (``assemble`` and ``dropped`` also
        counted in the errors and frames counters); a frame result is
        quarantined under its failed stage, ignored when the ledger already has
        the frame done (its files marked done), else recorded. A ``not_ready``
        event never gets here: the caller retries it
        (:func:`monitor.intake.files.retry_or_give_up`).

        Returns the counts recorded (for callbacks).

        Raises
        ------
        StateWriteError
            The record of truth cannot be written: the frame is not marked
            done (nor counted as an attempt), and the caller must stop.
        """
        recorded: list[Counts] = []
        for ev in events:
            if isinstance(ev, FileEvent):
                self.file_event(ev)
                continue
            if ev.incomplete:
                self.metrics.frames.labels("incomplete").inc()
            if ev.counts is None:
                self.metrics.errors.labels(ev.stage).inc()
                self.quarantine(list(ev.sources), ev.stage, ev.problem, ev.key)
                continue
            if self.ledger.frame_done(ev.key):
                log.info("frame %s already recorded; ignoring %s", ev.key, ", ".join(path_text(p) for p in ev.sources))
                self.ledger.mark_files(list(ev.sources), "done", ev.key)
                continue
            try:
                self.record(ev.counts)
            except StateWriteError:
                self.ledger.release_processing(ev.key)  # not the frame's fault: no attempt used
                raise
            recorded.append(ev.counts)
        return recorded

    def file_event(self, ev: FileEvent) -> None:
        """A file that will not become part of a counted frame: skipped or quarantined (:meth:`apply`)."""
        if ev.kind == "skip":
            self.skip(Path(ev.paths[0]), ev.problem, ev.key)
            return
        if ev.kind == "not_ready":
            raise ValueError(f"{ev.paths[0]}: a not-ready file is retried by intake, not recorded")
        if ev.kind == "assemble":
            self.metrics.errors.labels("assemble").inc()
        elif ev.kind == "dropped":
            self.metrics.frames.labels("dropped").inc()
        # an ``assemble`` failure, or a frame given up while a stage waited for its input, belongs to a
        # frame of its own; a dropped late file's frame may be recorded already, and must stay so
        self.quarantine(list(ev.paths), ev.stage, ev.problem, ev.key if ev.kind in ("assemble", "bad") else None)

    def record(self, counts: Counts) -> bool:
        """Hand ``counts`` to every sink; mark the frame done once the record of truth has it.

        Returns
        -------
        bool
            True when the frame is recorded (ledger: done).

        Raises
        ------
        StateWriteError
            A record-of-truth sink failed: the frame is not marked done; the
            service must stop (it is processed again at the next start).
        """
        fatal: BaseException | None = None
        # the record of truth first: a frame it cannot hold is shown nowhere
        for sink in sorted(self.sinks, key=lambda k: not k.record_of_truth):
            truth = sink.record_of_truth
            if fatal is not None and not truth:
                continue  # the frame is not recorded: no live view of it either
            try:
                sink.write(counts)
            except Exception as e:
                name = sink.name
                self.metrics.errors.labels(f"sink_{name}").inc()
                if truth:
                    fatal = e
                    continue
                log.error("%s: sink %s failed: %s: %s", counts.key, name, type(e).__name__, e)
        if fatal is not None:
            self.metrics.frames.labels("unrecorded").inc()
            if isinstance(fatal, CellmonitorError):
                raise fatal
            what = f"{fatal.strerror or fatal}" if isinstance(fatal, OSError) else f"{type(fatal).__name__}: {fatal}"
            raise StateWriteError(f"{counts.key}: cannot write the record of truth ({what}); stopped, the frame is processed again at the next start") from None
        roles = self.roles if self.roles is not None else class_roles(counts.counts)
        self.ledger.mark_counted(counts, counts.sources, roles)
        self.metrics.observe_frame(counts)
        self.counted += 1
        unsure = unreliable(counts)
        if unsure:
            log.warning("%s: %s: these counts are unreliable (does the reference index fit these cells?)", counts.key, unsure)
        log.info(
            "%s: %d cells %s%s%s",
            counts.key,
            counts.n_cells,
            " ".join(f"{k}={v}" for k, v in counts.counts.items()),
            f" (unknown={counts.n_unknown} uncertain={counts.n_uncertain})" if counts.n_unknown or counts.n_uncertain else "",
            f" control={counts.control.area_fraction:.3f}" if counts.control else "",
        )
        return True

    def skip(self, path: Path, reason: str, key: FrameKey | None = None) -> None:
        """A file this configuration does not count: final in the ledger, one INFO line."""
        self.skipped += 1
        self.metrics.files.labels("skipped").inc()
        self.ledger.mark_files([path], "skipped", key, reason)
        log.info("%s: skipped: %s", path_text(path), reason)

    def stale_to_retry(self, max_attempts: int) -> list[Stale]:
        """Frames a previous run left in flight: those that hung or used ``max_attempts`` are
        quarantined here; the others are returned, to be processed again, alone."""
        retry = []
        for st in self.ledger.stale_frames():
            if st.status == "hung" or st.attempts >= max_attempts:
                why = ("ran past service.frame_timeout_s in a previous run" if st.status == "hung"
                       else f"hung or crashed the worker in a previous run ({st.attempts} attempts)")
                self.quarantine(list(st.paths), "process", why, st.key)
            else:
                retry.append(st)
        return retry

    def note_read(self, path: Path, key: FrameKey) -> bool:
        """A file was read as part of frame ``key``: False (and the file marked done) when that
        frame is already recorded, else True (the file marked read)."""
        self.metrics.files.labels("read").inc()
        if self.ledger.frame_done(key):
            if self.ledger.is_known(path):
                # the same file again (a second watcher event or a rescan queued it while its frame
                # was processed): it was counted with its frame, nothing is missing
                log.info("%s: read again; frame %s was already recorded with it; ignoring", path_text(path), key)
                return False
            # a channel after its frame was counted, or a counted file rewritten: that timepoint's row keeps
            # what it had, and what this file holds (a control, a marker) is never measured unless replayed
            self.metrics.files.labels("late").inc()
            what = ("rewritten after frame %s was already recorded with its earlier content; the new content is not measured ("
                    if self.ledger.was_finished(path) else
                    "arrived after frame %s was already recorded; not measured (its row keeps missing_channels; ")
            log.warning("%s: " + what + "`cellmonitor replay` into a fresh state folder re-measures the whole run)", path_text(path), key)
            self.ledger.mark_files([path], "done", key)
            return False
        self.ledger.mark_files([path], "read", key)
        return True

    def quarantine(self, paths: Sequence[Path | str], stage: str, problem: str, key: FrameKey | str | None = None, status: str = "failed") -> None:
        """Record that ``paths`` (of frame ``key``, when known) will never become a count."""
        self.failed += 1
        problem = " ".join(problem.split())  # one line, whatever a plugin put in its message
        self.metrics.files.labels("quarantined").inc(len(paths))
        ps = [Path(p) for p in paths]
        if key is not None:
            self.metrics.frames.labels("failed").inc()
            self.ledger.mark_frame(key, ps, status, problem)
        else:
            self.ledger.mark_files(ps, "quarantined", None, problem)
        for p in paths:
            log.error("%s: %s (stage %s; quarantined)", path_text(p), problem, stage)
        buf = io.StringIO()
        w = csv.writer(buf)
        if not self.quarantine_csv.exists() or self.quarantine_csv.stat().st_size == 0:
            w.writerow(["time", "path", "stage", "problem"])
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for p in paths:
            w.writerow([now, path_text(p), stage, problem])
        try:
            self.quarantine_csv.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.quarantine_csv, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, buf.getvalue().encode("utf-8", "backslashreplace"))
            finally:
                os.close(fd)
        except OSError as e:
            raise StateWriteError(f"{self.quarantine_csv}: cannot write ({e.strerror or e})") from None

    def close(self) -> None:
        """Close every sink (a failure to close is a warning) and the ledger."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                log.warning("sink %s did not close cleanly: %s", sink.name, e)
        self.ledger.close()
