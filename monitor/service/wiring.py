"""Start-up wiring: everything a run needs, built from the config in start-up order.

The CLI, the run report, the demo, the Ray driver and its workers, and the
benches build their pipeline, sinks, recorder and metrics server here, so
that every engine starts the same way. The loop itself
(:mod:`monitor.service.loop`) builds nothing.

Start-up order (:func:`build_service`): watch folder, the state-folder lock
(a second instance exits 69 naming the holder's pid), plugins, models and
index (encoders checked against the index), one warm-up inference, sinks,
metrics server (a port that cannot be bound is fatal: READY=1 is never
sent), gauges restored from the record of truth. Configuration, plugin and
index errors are fatal at start-up (exit 78).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from monitor import __version__
from monitor.config import Config
from monitor.device import cpu_cores
from monitor.errors import ConfigError
from monitor.index.ewc import EWCClassifier, params_from_config
from monitor.index.from_marker import describe_cv
from monitor.index.query import query_pipeline
from monitor.index.store import ReferenceIndex
from monitor.intake.assemble import FrameAssembler
from monitor.intake.files import FileTracker, Intake, check_watch_dir
from monitor.intake.ledger import Ledger, StateLock
from monitor.intake.readers import ReaderSet, build_readers
from monitor.marker import MarkerCheck, resolve, with_fitted
from monitor.pipeline import Pipeline, embed
from monitor.protocols import BuildContext, Classifier, Sink, context_from
from monitor.service.feedback import Feedback
from monitor.service.loop import Service
from monitor.service.metrics import ServiceMetrics, serve
from monitor.service.recording import Recorder
from monitor.service.rows import class_roles

log = logging.getLogger(__name__)


def open_sinks(cfg: Config, registry: Any, ctx: BuildContext) -> list[Sink]:
    """The configured sinks, built with ``ctx`` (its ``roles`` name the sinks' columns)."""
    return [registry.build("sinks", ref, ctx, cfg.source_name, f"sinks.{i}") for i, ref in enumerate(cfg.sinks)]


def open_recorder(cfg: Config, sinks: Sequence[Sink], metrics: ServiceMetrics, roles: dict[str, str]) -> Recorder:
    """The recorder over ``sinks``, the ledger and the quarantine file; the gauges restored
    from the record of truth, so the dashboard shows every well's last state straight after a restart."""
    s = cfg.service
    recorder = Recorder(sinks, Ledger(s.state_dir / "ledger.sqlite"), metrics, s.state_dir / "quarantine.csv", roles)
    for sink in sinks:
        if sink.record_of_truth and sink.path is not None:
            n = metrics.restore(sink.path)
            if n:
                log.info("gauges of %d well(s) restored from %s", n, sink.path)
    return recorder


def start_metrics(cfg: Config, metrics: ServiceMetrics, serve_metrics: bool = True) -> Any:
    """The Prometheus endpoint (None when off); a port that cannot be bound is fatal."""
    s = cfg.service
    if not (serve_metrics and s.metrics_port):
        return None
    server = serve(metrics.registry, s.metrics_port, s.metrics_addr)
    log.info("metrics at http://%s:%d/metrics", s.metrics_addr, s.metrics_port)
    return server


def build_encoders(cfg: Config, registry: Any, ctx: BuildContext) -> list[Any]:
    """The configured encoders, in concatenation order."""
    return [registry.build("encoders", ref, ctx, cfg.source_name, f"encoders.{i}") for i, ref in enumerate(cfg.encoders)]


def load_index(cfg: Config, encoders: Sequence[Any]) -> ReferenceIndex:
    """The configured index, refused (one line naming the fix) unless built with these encoders' ids and dims."""
    return ReferenceIndex.load(cfg.classifier.index, [{"id": e.id, "dim": e.dim} for e in encoders])


def build_pipeline(cfg: Config, registry: Any, ctx: Any, classifier: Classifier | None = None) -> Pipeline:
    """Segmenter, encoders, index and classifier from the config; all errors fatal.

    With ``classifier`` given, no index is loaded (the demo and benches use
    this to embed reference cells through the service's own components).
    """
    segmenter = registry.build("segmenters", cfg.segmenter, ctx, cfg.source_name, "segmenter")
    encoders = build_encoders(cfg, registry, ctx)
    torch_threads_beside_runtime(encoders)
    p = cfg.pipeline
    if classifier is None:
        index = load_index(cfg, encoders)
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
    index = None

    def classify(self, emb: Any) -> Any:
        raise RuntimeError("reference index not built yet")


def pipeline_without_index(cfg: Config, registry: Any, ctx: Any) -> Pipeline:
    """The service's segmenter, encoders and crop settings, before any index exists
    (to embed reference cells through the service's own components)."""
    return build_pipeline(cfg, registry, ctx, classifier=_NoIndex())


def feedback_for(cfg: Config, readers: ReaderSet, pipeline: Pipeline, metrics: ServiceMetrics) -> Any:
    """The feedback folder's poller, or None when off (or the classifier has no index to add to)."""
    s = cfg.service
    index = pipeline.classifier.index
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
    table = with_fitted(cfg.marker.model_dump(), (index.preprocessing or {}).get("marker"))
    for r in table["rules"]:
        if r["threshold"] == "otsu":
            raise ConfigError(f"{cfg.source_name}: marker rule {r['channel']} -> {r['state']}: threshold 'otsu' is fitted by "
                              f"'index build --from-marker', and index {cfg.classifier.index} was not; give a number")
    rules = resolve(table)
    log.info("marker agreement: %s; else %s", "; ".join(f"{r.channel} > {r.threshold:.3g} -> {r.state}" for r in rules.rules), rules.negative)
    cv = (index.preprocessing or {}).get("marker_cv")
    if cv:
        log.info("%s", describe_cv(cv))
    return MarkerCheck(rules, class_roles(index.classes, cfg.classifier.roles))


def torch_threads_beside_runtime(encoders: Sequence[Any]) -> None:
    """Every encoder on a CPU inference runtime: torch keeps one thread, and so does BLAS.

    torch is then left only small steps (crop preprocessing, the unknown-cell distances);
    with its thread pool beside the runtime's, each of those small calls took about 75 ms
    instead of 1 ms on the 2-core machine (bench/bench_runtime.py), a fifth of a frame of
    the ``fast`` preset. The same holds for BLAS (numpy's and FAISS's OpenBLAS: the index's
    conditioning, a 44 x 2064 by 2064 x 128 product for a ``fast`` frame): its two threads
    spin for each other while the segment-ahead thread and the runtime hold the cores, and
    a frame's classify step took 50-200 ms instead of 15 ms in a backlog (a sixth of the
    frame; :func:`blas_threads`). An encoder still on torch (a GPU, a foundation model)
    keeps torch's and BLAS's threads as they are.
    """
    import torch

    if encoders and all(not str(e.runtime).startswith("torch") for e in encoders):
        torch.set_num_threads(1)
        blas_threads(1)


def blas_threads(n: int | None = None) -> int | None:
    """Set the BLAS libraries' threads to ``n`` (None: leave them); the threads now (None: unknown).

    Through ``threadpoolctl`` (installed with the ``cpu`` extra); without it nothing is
    changed and None is returned.
    """
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - the cpu extra brings it
        return None
    if n is not None:
        threadpoolctl.threadpool_limits(n, user_api="blas")
    counts = [int(d["num_threads"]) for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
    return max(counts) if counts else None


def compute_line(pipeline: Pipeline) -> str:
    """What runs each encoder (runtime, version, threads) and the torch threads: the run's log says it."""
    import torch

    encs = "; ".join(f"{e.name} on {e.runtime}" for e in pipeline.encoders)
    blas = blas_threads()
    return (f"{encs}; torch {torch.get_num_threads()} thread(s); BLAS {blas if blas is not None else '?'} thread(s); segmenter {type(pipeline.segmenter).__name__} in one thread "
            f"ahead of the encoders (a backlog: the next frames are segmented while this call embeds); {cpu_cores()} core(s)")


def warm_up(pipeline: Pipeline) -> float:
    """One inference through every encoder and the classifier, so the first frame is not slow."""
    t = time.perf_counter()
    crop = np.full((1, pipeline.crop_px, pipeline.crop_px, 3), 128, np.uint8)
    pipeline.classifier.classify(embed(crop, pipeline.encoders, 1))
    return time.perf_counter() - t


def build_service(cfg: Config, registry: Any, metrics_registry: Any = None, serve_metrics: bool = True) -> tuple[Service, Any]:
    """Everything the service needs, in start-up order; returns (service, metrics http server or None)."""
    s = cfg.service
    check_watch_dir(s.watch_dir)  # before the (slow) model and index loading
    lock = StateLock(s.state_dir)  # a second instance stops here, before loading anything
    try:
        metrics = ServiceMetrics(metrics_registry or CollectorRegistry(), __version__)
        ctx = context_from(cfg, metrics=metrics)
        readers = build_readers(cfg, registry, ctx)
        t = time.perf_counter()
        pipeline = build_pipeline(cfg, registry, ctx)
        log.info("models and index loaded in %.1fs (device %s); warm-up %.2fs", time.perf_counter() - t, ctx.device, warm_up(pipeline))
        log.info("compute: %s", compute_line(pipeline))
        ctx.roles = metrics.roles = roles_for(cfg, pipeline.classifier.classes)
        sinks = open_sinks(cfg, registry, ctx)
        if any(k.wants_calls for k in sinks):  # e.g. the overlay sink
            pipeline = replace(pipeline, keep_calls=True)
        server = start_metrics(cfg, metrics, serve_metrics)
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
    s = cfg.service
    lock = kw.pop("lock", None) or StateLock(s.state_dir)
    try:
        roles = metrics.roles if metrics.roles is not None else class_roles(pipeline.classifier.classes, cfg.classifier.roles)
        metrics.roles = roles
        recorder = open_recorder(cfg, sinks, metrics, roles)
        intake = Intake(FileTracker(s.stable_s, s.ready_deadline_s), recorder.ledger, s.watch_dir, s.patterns, s.recursive)
        assembler = FrameAssembler.from_config(cfg)
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
