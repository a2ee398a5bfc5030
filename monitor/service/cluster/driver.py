"""The replay's driver: scan, group, ship units to the workers, record in the local order."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from monitor import __version__
from monitor.config import Config
from monitor.errors import ConfigError, Unavailable, UsageError
from monitor.intake.assemble import FrameAssembler
from monitor.intake.events import Event, FileEvent
from monitor.intake.files import FileTracker, Intake, check_watch_dir, retry_or_give_up
from monitor.intake.ledger import StateLock, path_text
from monitor.protocols import context_from
from monitor.records import Acquisition, Counts, Frame
from monitor.service.cluster.pool import Call, Pool, ReplayStats, Unit, UnitQueue
from monitor.service.cluster.worker import FrameWorker
from monitor.service.metrics import ServiceMetrics
from monitor.service.wiring import (
    open_recorder,
    open_sinks,
    roles_for,
    start_metrics,
    stop_server,
)

log = logging.getLogger(__name__)

INSTALL = "pip install 'cellmonitor[cluster]'"


def import_ray() -> ModuleType:
    """The ``ray`` module, or :class:`ConfigError` (exit 78) naming the extra to install.

    A missing optional package is a configuration problem, as for a model
    whose extra is missing.
    """
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--engine ray needs the ray package ({e}): {INSTALL}") from None
    return ray


def _unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """None when something listens at ``[ray://]HOST:PORT``, else why not.

    Raises
    ------
    UsageError
        ``address`` is not ``HOST:PORT``.
    """
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected HOST:PORT (as `ray start --head` prints it)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


class ClusterReplay:
    """``replay --engine ray``: the driver's side (module docstring).

    Parameters
    ----------
    cfg, registry
        The validated configuration and the plugin registry (sinks are built here).
    workers
        Number of actors; default: as many as the cluster's CPUs (or GPUs,
        with ``gpus_per_worker``) allow.
    window
        Most frames sent and not yet recorded (default 4 x workers x
        ``pipeline.frames_per_call``); results are recorded in order.
    address
        A running Ray cluster (``ray start --head`` prints it); default: the
        one this process is already connected to, or a new local one.
    """

    def __init__(self, cfg: Config, registry: Any, workers: int | None = None, address: str | None = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, serve_metrics: bool = True,
                 on_counts: Callable[[Counts], None] | None = None, window: int = 0, worker_class: type = FrameWorker):
        self.cfg = cfg
        self.registry = registry
        self.workers = workers
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.serve_metrics = serve_metrics
        self.on_counts = on_counts
        self.window = window
        self.worker_class = worker_class  # FrameWorker; the benchmark's no-op workers measure the driver alone
        self.stats = ReplayStats()
        self.recorder: Any = None  # built once the workers told the classes (the sinks' columns)
        self.server: Any = None
        #: called after each recorded frame with the stats (tests kill a worker from here)
        self.on_recorded: Callable[[ReplayStats], None] | None = None

    # ---- start-up ----------------------------------------------------------------------
    def _connect(self, ray: ModuleType) -> bool:
        """Connect to (or start) a cluster; True when this call started the connection."""
        if self.address and self.address != "auto":  # Ray itself retries a dead address for minutes
            why = _unreachable(self.address)
            if why:
                raise Unavailable(f"--address {self.address}: no Ray cluster there ({why}); start one with `ray start --head`")
        if ray.is_initialized():  # an embedding program (a test, a notebook) already chose its cluster
            return False
        kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
        try:
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                ray.init(**kw)
        except (ConnectionError, TimeoutError, RuntimeError) as e:
            raise Unavailable(f"--address {self.address or 'local'}: cannot connect to a Ray cluster ({' '.join(str(e).split())[:300]})") from None
        return True

    def _start_actors(self, ray: ModuleType) -> list[Any]:
        res = ray.cluster_resources()
        cpu, gpu = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        if self.gpus_per_worker > 0:
            fit = int(gpu // self.gpus_per_worker)
            what = f"{gpu:g} GPU(s) for {self.gpus_per_worker:g} per worker"
        else:
            fit = int(cpu // self.cpus_per_worker) if self.cpus_per_worker > 0 else 1
            what = f"{cpu:g} CPU(s) for {self.cpus_per_worker:g} per worker"
        n = self.workers or max(1, fit)
        if n > fit:
            raise UsageError(f"--workers {n}: the cluster has {what} (room for {fit})")
        cls = ray.remote(self.worker_class).options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                              max_restarts=-1, max_task_retries=0)
        actors = [cls.remote(self.cfg) for _ in range(n)]
        log.info("starting %d worker(s) (%s each); each loads the models and the index", n,
                 f"{self.gpus_per_worker:g} GPU" if self.gpus_per_worker else f"{self.cpus_per_worker:g} CPU")
        infos = ray.get([a.info.remote() for a in actors])  # waits while the cluster has no room for them

        failed = next((i["failure"] for i in infos if i["failure"]), None)
        other = sorted({str(i.get("version")) for i in infos} - {__version__})
        if other and not failed:  # the record of truth must not mix two versions' counts
            failed = f"workers run cellmonitor {', '.join(other)} but this driver runs {__version__}; install the same version on every node"
        if failed:
            for a in actors:
                ray.kill(a)
            raise ConfigError(f"worker: {failed}")
        self.stats.actor_pids = [int(i["pid"]) for i in infos]
        self.stats.workers = n
        log.info("%d worker(s) ready on %s", n, ", ".join(sorted({str(i["host"]) for i in infos})))
        self.classes = tuple(infos[0]["classes"])
        return actors

    def _build_recorder(self) -> None:
        """Sinks, recorder, gauges and metrics server, as the local service builds them."""
        from prometheus_client import CollectorRegistry

        cfg = self.cfg
        self.metrics = metrics = ServiceMetrics(CollectorRegistry(), __version__)
        roles = roles_for(cfg, self.classes)
        metrics.roles = roles
        sinks = open_sinks(cfg, self.registry, context_from(cfg, device="cpu", metrics=metrics, roles=roles))
        self.keep_calls = any(k.wants_calls for k in sinks)  # e.g. the overlay sink
        self.recorder = open_recorder(cfg, sinks, metrics, roles)
        self.server = start_metrics(cfg, metrics, self.serve_metrics)

    # ---- the run -----------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> ReplayStats:
        """Replay every unfinished file of the watch folder on the cluster; returns what was done.

        Raises
        ------
        ConfigError
            Ray is not installed, or a worker cannot build the pipeline (exit 78).
        Unavailable
            No watch folder, no cluster at ``address``, the state folder in use (exit 69).
        StateWriteError
            The record of truth cannot be written (exit 74).
        """

        stop = stop or threading.Event()
        t0 = time.monotonic()
        s = self.cfg.service
        check_watch_dir(s.watch_dir)
        ray = import_ray()
        lock = StateLock(s.state_dir)
        started = False
        actors: list[Any] = []
        try:
            started = self._connect(ray)
            actors = self._start_actors(ray)
            self._build_recorder()
            self.stats.startup_s = time.monotonic() - t0
            pool = Pool(ray, actors, self.stats)
            solo = self._recover()  # before the scan: a frame quarantined here is finished
            units = self._units(pool, self._files(), solo, stop)
            self._process(pool, units, stop)
        finally:
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:  # pragma: no cover - the cluster may be gone
                    pass
            if self.recorder is not None:
                self.recorder.close()
            lock.release()
            stop_server(self.server)
            if started:
                ray.shutdown()
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _files(self) -> list[str]:
        """Files of the watch folder the ledger has not finished, in the local replay's order."""

        s = self.cfg.service
        intake = Intake(FileTracker(0.0, s.ready_deadline_s), self.recorder.ledger, s.watch_dir, s.patterns, s.recursive)
        intake.backlog()  # irregular files named like frames are told and skipped here, as locally
        files = [str(p) for p in intake.tracker.ready()]
        self.stats.files = len(files)
        log.info("backlog: %d file(s) in %s not yet processed", len(files), path_text(s.watch_dir))
        return files

    def _recover(self) -> set[str]:
        """Frames a local run left in flight: quarantined at ``max_frame_attempts``, else done alone."""
        return {p for st in self.recorder.stale_to_retry(self.cfg.service.max_frame_attempts) for p in st.paths}

    def _units(self, pool: Pool, files: list[str], solo: set[str], stop: threading.Event) -> list[Unit]:
        """Files grouped into frames (one file each without ``[assembly] channels``), in local order;
        frames a previous run left in flight (``solo``) go alone."""
        groups = self._group(pool, files, stop) if self.cfg.assembly.channels else [(f,) for f in files]
        return [Unit(i, g, solo=any(p in solo for p in g)) for i, g in enumerate(groups)]

    def _group(self, pool: Pool, files: list[str], stop: threading.Event) -> list[tuple[str, ...]]:
        """Workers decode identities; the service's assembler groups them here, as it would locally."""
        ident: dict[str, Acquisition | FileEvent] = {}
        todo = UnitQueue([Unit(i, (f,)) for i, f in enumerate(files)])
        while (todo or pool.working) and not stop.is_set():
            while todo and pool.free() is not None:
                batch = todo.take(16, time.monotonic())
                if not batch:
                    break
                pool.submit("identify", batch, [u.paths[0] for u in batch])
            pool.kill_overdue(self.cfg.service.frame_timeout_s)  # a read that hangs costs its worker, not the run
            for call, result, err in pool.wait(0.2):
                for j, u in enumerate(call.units):
                    r = None if err is not None else result[j]
                    if r is None:
                        self._lost(u, err, todo, call)
                    elif isinstance(r, FileEvent) and r.kind == "not_ready" and not self._give_up(u, r):
                        todo.later(u)
                    else:
                        ident[u.paths[0]] = r
        asm = FrameAssembler.from_config(self.cfg)
        groups: list[tuple[str, ...]] = []

        def take(out: Frame | FileEvent | None) -> None:
            if isinstance(out, FileEvent):
                self.recorder.apply([out])
            elif out is not None:
                groups.append(tuple(map(str, out.sources)))

        for f in files:
            r = ident.get(f)
            if r is None:
                continue  # stopped, or lost: the next replay takes it
            if isinstance(r, FileEvent):
                self.recorder.apply([r])
            elif self.recorder.note_read(Path(f), r.key):
                take(asm.add(r))
        for out in asm.due(force=True):
            take(out)
        return groups

    def _give_up(self, u: Unit, ev: FileEvent) -> bool:
        """A file still being written: retried with back-off, quarantined after ``ready_deadline_s``
        (:func:`monitor.intake.files.retry_or_give_up`, as locally)."""
        gave_up = retry_or_give_up(ev, u.retry, self.cfg.service.ready_deadline_s, time.monotonic())
        if gave_up is None:
            return False
        self.recorder.apply([gave_up])
        return True

    def _lost(self, u: Unit, err: BaseException | None, queue: UnitQueue, call: Call | None = None) -> bool:
        """A unit whose worker died: sent again alone, or quarantined after ``max_frame_attempts``.

        A call killed for its time limit: one frame alone is quarantined;
        frames that shared it, or were queued behind it, go again alone
        without using an attempt. Returns True when the unit was quarantined.
        """
        s = self.cfg.service
        why = " ".join(f"{type(err).__name__}: {err}".split())[:200] if err is not None else "worker lost"
        if call is not None and call.timed_out and len(call.units) == 1:
            self.metrics.frames.labels("over_time_limit").inc()
            self.recorder.quarantine(list(u.paths), "process", f"still processing after {s.frame_timeout_s:g}s (service.frame_timeout_s = {s.frame_timeout_s:g}); its worker was killed")
            return True
        if call is None or not (call.timed_out or call.innocent):
            u.attempts += 1
        if u.attempts >= s.max_frame_attempts:
            self.recorder.quarantine(list(u.paths), "process", f"its worker died {u.attempts} times while processing it (last: {why})")
            return True
        log.warning("%s: worker lost (%s); sending it again, alone (attempt %d of %d)", u.paths[0], why, u.attempts + 1, s.max_frame_attempts)
        u.solo = True
        self.stats.resubmitted += 1
        queue.front(u)
        return False

    def _process(self, pool: Pool, units: list[Unit], stop: threading.Event) -> None:
        """Ship units to the workers; record results in unit order as they come back."""
        fpc = max(1, self.cfg.pipeline.frames_per_call)
        window = self.window or 4 * len(pool.actors) * fpc
        todo = UnitQueue(units)
        finished: dict[int, list[Event]] = {}
        order = [u.seq for u in units]
        head = 0  # index into order of the next unit to record
        limit = self.cfg.service.frame_timeout_s

        def outstanding() -> int:  # sent or back, not yet recorded
            return len(order) - head - len(todo)

        while (todo or pool.working) and not (stop.is_set() and not pool.working):
            now = time.monotonic()
            while not stop.is_set() and todo and pool.free() is not None and outstanding() < window:
                batch = todo.take(fpc, now)
                if not batch:
                    break
                pool.submit("process", batch, [u.paths for u in batch], self.keep_calls)
            pool.kill_overdue(limit)
            for call, result, err in pool.wait(0.2):
                if err is not None:
                    for u in call.units:
                        if self._lost(u, err, todo, call):
                            finished[u.seq] = []
                    continue
                for u, events in zip(call.units, result, strict=True):
                    waiting = [e for e in events if isinstance(e, FileEvent) and e.kind == "not_ready"]
                    if waiting and not self._give_up(u, waiting[0]):
                        todo.later(u)
                    elif waiting:  # given up on the unready file(s): the rest of the frame goes on
                        rest = tuple(p for p in u.paths if p not in set(waiting[0].paths))
                        if rest:
                            todo.front(replace(u, paths=rest, retry=replace(u.retry, next_try=0.0)))
                        else:
                            finished[u.seq] = []
                    else:
                        finished[u.seq] = events
            while head < len(order) and order[head] in finished:
                self._apply(finished.pop(order[head]))
                head += 1
        for q in order[head:]:  # stopped: what came back is recorded, the rest waits for the next replay
            if q in finished:
                self._apply(finished.pop(q))

    def _apply(self, events: Sequence[Event]) -> None:
        """One unit's outcome into the ledger, the sinks and the quarantine (:meth:`Recorder.apply`,
        as the local loop records it)."""
        for c in self.recorder.apply(events):
            self.stats.frames += 1
            if self.on_counts is not None:
                self.on_counts(c)
            if self.on_recorded is not None:
                self.on_recorded(self.stats)
