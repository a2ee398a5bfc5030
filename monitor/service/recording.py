"""Recording results: sinks, the record of truth, the ledger and the quarantine.

Policy
------
* A frame is marked done in the ledger only after every record-of-truth sink
  (``record_of_truth = True``, the CSV sink) wrote it. If one fails, the frame
  stays unrecorded and is processed again at the next start.
* Any other sink (Prometheus) failing is logged and counted, never fatal.
* A file or frame that cannot become a count is quarantined: one ERROR line
  naming the file and the problem, a ledger row, a row in
  ``<state_dir>/quarantine.csv`` and a metrics counter. The instrument's files
  are never moved or modified.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from monitor.protocols import Sink
from monitor.records import Counts, Frame, FrameKey
from monitor.service.ledger import Ledger
from monitor.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class Recorder:
    """Where every outcome of a frame or file goes; one instance per service."""

    def __init__(self, sinks: Sequence[Sink], ledger: Ledger, metrics: ServiceMetrics, quarantine_csv: Path):
        self.sinks = list(sinks)
        self.ledger = ledger
        self.metrics = metrics
        self.quarantine_csv = quarantine_csv
        self.counted = 0
        self.failed = 0

    def record(self, frame: Frame, counts: Counts) -> bool:
        """Hand ``counts`` to every sink; mark the frame done if the record of truth has it.

        Returns
        -------
        bool
            True when the frame is recorded (ledger: done); False when a
            record-of-truth sink failed (the frame is processed again later).
        """
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
            return False
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
        return True

    def quarantine(self, paths: Sequence[Path], stage: str, problem: str, key: FrameKey | None = None) -> None:
        """Record that ``paths`` (of frame ``key``, when known) will never become a count."""
        self.failed += 1
        self.metrics.files.labels("quarantined").inc(len(paths))
        if key is not None:
            self.metrics.frames.labels("failed").inc()
            self.ledger.mark_frame(key, paths, "failed", problem)
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
        """Close every sink (a failure to close is a warning) and the ledger."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                log.warning("sink %s did not close cleanly: %s", getattr(sink, "name", sink), e)
        self.ledger.close()
