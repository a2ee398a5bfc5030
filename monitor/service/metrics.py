"""Prometheus metrics, created against an injected CollectorRegistry (never the global one).

Names carry the ``cellmonitor_`` prefix and base units; labels are of low
cardinality (instrument, experiment, well, state, stage, result): never file
names, cell ids or timepoints. Per-cell history belongs in the CSV.

The ``state`` label is the canonical state (live, apoptotic, necrotic, dead,
other; see :func:`monitor.service.rows.class_roles`), so a dashboard works
whatever the reference index calls its classes. At start-up the per-well
gauges are restored from the record of truth (:meth:`ServiceMetrics.restore`),
so a restart does not blank the dashboard.

Every file that does not become part of a count is counted in
``cellmonitor_files_total{result="quarantined"|"skipped"}``: the dashboard's
"Errors" panel sums them.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from monitor.errors import ConfigError, Unavailable
from monitor.intake.ledger import safe_text
from monitor.records import Counts
from monitor.service.rows import CANONICAL, NOT_CLASS_COUNTS, by_role, class_roles

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    """Every metric of the service, created against one injected registry."""

    def __init__(self, registry: CollectorRegistry, version: str = "0", roles: Mapping[str, str] | None = None):
        self.registry = registry
        self.roles = dict(roles) if roles is not None else None
        r = registry
        self.build_info = Info("cellmonitor_build", "cellmonitor version and configuration", registry=r)
        self.build_info.info({"version": version})
        self.stage_seconds = Histogram(
            "cellmonitor_stage_duration_seconds", "Time per pipeline stage per frame", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.frames = Counter("cellmonitor_frames_total", "Frames by result", ["result"], registry=r)
        self.files = Counter("cellmonitor_files_total", "Input files by result", ["result"], registry=r)
        self.errors = Counter("cellmonitor_errors_total", "Per-frame errors by stage", ["stage"], registry=r)
        self.cells = Counter("cellmonitor_cells_total", "Cells classified", ["experiment", "state"], registry=r)
        self.state_count = Gauge(
            "cellmonitor_latest_cells", "Cells per state in the latest frame of each well", ["instrument", "experiment", "well", "state"], registry=r
        )
        self.state_fraction = Gauge(
            "cellmonitor_state_fraction", "Fraction of cells per state in the latest frame of each well", ["instrument", "experiment", "well", "state"], registry=r
        )
        self.uncertain = Gauge(
            "cellmonitor_uncertain_cells", "Cells below the certainty floor in the latest frame", ["instrument", "experiment", "well"], registry=r
        )
        self.unknown = Gauge(
            "cellmonitor_unknown_cells", "Cells farther from their nearest references than the index's calibrated distance, latest frame",
            ["instrument", "experiment", "well"], registry=r
        )
        self.unreliable = Gauge(
            "cellmonitor_unreliable_share",
            "Share of the latest frame's cells that are unknown or uncertain, whichever is larger (>= 0.5: the counts are unreliable)",
            ["instrument", "experiment", "well"], registry=r
        )
        self.marker_agreement = Gauge(
            "cellmonitor_marker_agreement", "Share of death-marker-labelled cells the classifier agrees with, latest frame with the marker",
            ["instrument", "experiment", "well"], registry=r
        )
        self.smoothed_cells = Gauge(
            "cellmonitor_smoothed_cells",
            "Cells per smoothed state (one-way along each track; cellmonitor_latest_cells stays the record), latest frame of each field, summed per well",
            ["experiment", "well", "state"], registry=r
        )
        self.ec50 = Gauge(
            "cellmonitor_ec50", "EC50 of the latest timepoint's dose-response fit per compound and measure, in the plate map's unit (absent: no usable fit)",
            ["experiment", "compound", "measure", "unit"], registry=r
        )
        self.index_version = Gauge("cellmonitor_index_version", "Version of the reference index (grows with expert corrections)", registry=r)
        self.control_area = Gauge(
            "cellmonitor_control_area_square_meters", "Otsu control-signal area in the latest frame (1e-12 = 1 square micrometre)",
            ["instrument", "experiment", "well"], registry=r
        )
        self.control_fraction = Gauge(
            "cellmonitor_control_area_fraction", "Otsu control-signal area fraction in the latest frame", ["instrument", "experiment", "well"], registry=r
        )
        self.latest_timepoint = Gauge(
            "cellmonitor_latest_timepoint", "Index of the latest counted timepoint", ["instrument", "experiment", "well"], registry=r
        )
        self.queue_depth = Gauge("cellmonitor_queue_depth", "Files waiting to be read or frames waiting for channels", ["queue"], registry=r)
        self.last_success = Gauge("cellmonitor_last_success_timestamp_seconds", "Unix time of the last counted frame", registry=r)
        self.up_since = Gauge("cellmonitor_start_time_seconds", "Unix time the service started", registry=r)
        self.up_since.set(time.time())

    def _roles(self, classes: Mapping[str, int]) -> Mapping[str, str]:
        return self.roles if self.roles is not None else class_roles(classes)

    def _set_latest(self, lab: tuple[str, str, str], per_state: Mapping[str, int], n_cells: int, n_uncertain: int,
                    control_area_um2: float | None, control_fraction: float | None, timepoint: int,
                    n_unknown: int = 0, marker_agreement: float | None = None) -> None:
        for state, n in per_state.items():
            self.state_count.labels(*lab, state).set(n)
            self.state_fraction.labels(*lab, state).set(n / n_cells if n_cells else 0.0)
        self.uncertain.labels(*lab).set(n_uncertain)
        self.unknown.labels(*lab).set(n_unknown)
        self.unreliable.labels(*lab).set(max(n_unknown, n_uncertain) / n_cells if n_cells else 0.0)
        if marker_agreement is not None:
            self.marker_agreement.labels(*lab).set(marker_agreement)
        if control_area_um2 is not None and control_fraction is not None:
            self.control_area.labels(*lab).set(control_area_um2 * 1e-12)
            self.control_fraction.labels(*lab).set(control_fraction)
        self.latest_timepoint.labels(*lab).set(timepoint)

    def observe_counts(self, c: Counts) -> None:
        """The latest counts of a well, by canonical state (the Prometheus sink calls this)."""
        per_state = by_role(c.counts, self._roles(c.counts))
        for state, n in per_state.items():
            if n:
                self.cells.labels(safe_text(c.key.experiment), state).inc(n)
        ctl = c.control
        lab = (safe_text(c.instrument), safe_text(c.key.experiment), safe_text(c.key.well))  # names may not be UTF-8
        m = c.marker
        self._set_latest(lab, per_state, c.n_cells, c.n_uncertain,
                         ctl.area_um2 if ctl else None, ctl.area_fraction if ctl else None, c.key.timepoint,
                         c.n_unknown, m.fraction if m and m.n_labelled else None)
        if c.index_version:
            self.index_version.set(c.index_version)

    def restore(self, csv_path: Path) -> int:
        """Set the per-well gauges from the latest row of each well in the record of truth.

        Returns the number of wells restored. Rows written before class roles
        existed (no ``state_*`` columns) are mapped through the roles here.
        An unreadable file restores nothing (a warning): it is not fatal.
        """
        latest: dict[tuple[str, str, str], dict[str, str]] = {}
        try:
            with csv_path.open(newline="", encoding="utf-8", errors="backslashreplace") as f:
                for row in csv.DictReader(f):
                    lab = (row.get("instrument") or "", row.get("experiment") or "", row.get("well") or "")
                    old = latest.get(lab)
                    if old is None or int(row["timepoint"]) >= int(old["timepoint"]):
                        latest[lab] = row
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, csv.Error) as e:
            log.warning("%s: gauges not restored (%s)", csv_path, e)
            return 0
        for lab, row in latest.items():
            try:
                if any(k.startswith("state_") for k in row):
                    per_state = {s: int(row.get(f"state_{s}") or 0) for s in CANONICAL}
                else:
                    classes = {k[2:]: int(v or 0) for k, v in row.items() if k.startswith("n_") and k not in NOT_CLASS_COUNTS}
                    per_state = by_role(classes, self._roles(classes))
                area = row.get("control_area_um2") or ""
                frac = row.get("control_area_fraction") or ""
                agree = row.get("marker_agreement") or ""
                self._set_latest(lab, per_state, int(row["n_cells"]), int(row.get("n_uncertain") or 0),
                                 float(area) if area else None, float(frac) if frac else None, int(row["timepoint"]),
                                 int(row.get("n_unknown") or 0), float(agree) if agree else None)
            except (ValueError, KeyError) as e:
                log.warning("%s: gauges of well %s not restored (%s)", csv_path, lab[2], e)
        return len(latest)

    def observe_frame(self, c: Counts) -> None:
        """Service-level: stage durations, frame counter, last-success time."""
        for stage, s in c.stage_seconds.items():
            self.stage_seconds.labels(stage).observe(s)
        self.frames.labels("counted").inc()
        self.last_success.set(time.time())


def serve(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    """Start the /metrics HTTP server in a daemon thread; returns (server, thread).

    A port that cannot be bound is a start-up error, never a silent
    degradation (Grafana would go blank while systemd reports the service
    healthy): in use -> :class:`Unavailable` (exit 69, systemd retries);
    an address that is not this machine's or a privileged port -> ConfigError (78).
    """
    import errno

    from prometheus_client import start_http_server


    try:
        return start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        where = f"service.metrics_addr/metrics_port {addr}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise Unavailable(f"{where}: address already in use (another cellmonitor or exporter?)") from None
        raise ConfigError(f"{where}: cannot listen ({e.strerror or e})") from None
    except UnicodeError as e:
        raise ConfigError(f"service.metrics_addr {addr!r}: not an address ({e})") from None
