"""Prometheus sink: latest counts, fractions and control signal as gauges.

It writes into the service's metrics (one injected CollectorRegistry served at
``/metrics``). A Prometheus failure is never fatal: the CSV is the record.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict

from monitor.protocols import SinkBase
from monitor.records import Counts
from monitor.registry import plugin_spec
from monitor.service.metrics import ServiceMetrics


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrometheusSink(SinkBase):
    name = "prometheus"
    record_of_truth = False  # live view only; the CSV is the record

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def write(self, counts: Counts) -> None:
        self.metrics.observe_counts(counts)

    def close(self) -> None:
        pass


PLUGIN = plugin_spec(
    "prometheus", "latest per-well counts, fractions and control signal as /metrics gauges", Options,
    lambda o, ctx: PrometheusSink(ctx.metrics or ServiceMetrics(CollectorRegistry())),
)
