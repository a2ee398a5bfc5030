"""Prometheus metrics, created against an injected CollectorRegistry (never the global one).

Names carry the ``cellmonitor_`` prefix and base units; labels are of low
cardinality (instrument, experiment, well, state, stage, result): never file
names, cell ids or timepoints. Per-cell history belongs in the CSV.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from monitor.records import Counts

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry, version: str = "0"):
        self.registry = registry
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
        self.control_area = Gauge(
            "cellmonitor_control_area_square_micrometres", "Otsu control-signal area in the latest frame", ["instrument", "experiment", "well"], registry=r
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

    def observe_counts(self, c: Counts) -> None:
        lab = (c.instrument, c.key.experiment, c.key.well)
        for state, n in c.counts.items():
            self.state_count.labels(*lab, state).set(n)
            self.state_fraction.labels(*lab, state).set(c.fraction(state))
            self.cells.labels(c.key.experiment, state).inc(n)
        self.uncertain.labels(*lab).set(c.n_uncertain)
        if c.control is not None:
            self.control_area.labels(*lab).set(c.control.area_um2)
            self.control_fraction.labels(*lab).set(c.control.area_fraction)
        self.latest_timepoint.labels(*lab).set(c.key.timepoint)

    def observe_frame(self, c: Counts) -> None:
        """Service-level: stage durations, frame counter, last-success time."""
        for stage, s in c.stage_seconds.items():
            self.stage_seconds.labels(stage).observe(s)
        self.frames.labels("counted").inc()
        self.last_success.set(time.time())


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):  # type: ignore[no-untyped-def]
    """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr, registry=registry)
