"""Replay an archive on a Ray cluster: workers read and process, the driver alone records.

``cellmonitor replay CONFIG --engine ray`` runs the service's straight line
on a pool of Ray actors. Ray is imported only here, only when this engine
is chosen (``pip install 'cellmonitor[cluster]'``).

Design
------
* **Workers** are Ray actors (:class:`FrameWorker`), one model replica each
  (``num_cpus`` / ``num_gpus`` per actor). Each builds the readers and the
  pipeline once, with the service's own :func:`~monitor.service.loop.build_pipeline`
  and warm-up, and runs the same :func:`~monitor.pipeline.process_frames`.
  Workers read the frames themselves: the driver ships file paths (shared
  storage is the normal layout), a worker ships back :class:`Counts`, never
  pixels.
* **The driver** alone writes the record of truth, through the same
  :class:`~monitor.service.recording.Recorder`, ledger and sinks as
  ``cellmonitor run``, and records frames in the order a local replay does
  (a reorder buffer behind a bounded window of frames in flight), so the
  CSV is the local replay's row for row.
* **Frames** are the local ones: with ``[assembly] channels`` configured, a
  first pass has the workers decode each file's identity (key, channels,
  roles; pixels stay on the worker) and the driver runs the real
  :class:`~monitor.service.assemble.FrameAssembler` on identity-only
  acquisitions, which gives the local grouping, order, skips and drops;
  each released frame's files are then read and assembled again on one
  worker. Without channels every file is a frame and is read once.

Exactly-once and resumable
--------------------------
* A file the ledger finished is not shipped; a frame the ledger has done is
  not recorded again (its files are marked done); the CSV sink never writes
  a key twice. A driver killed at any moment leaves its frames in flight
  unfinished in the ledger, so the next replay does them again, once.
* A worker that dies (killed, out of memory, node lost) fails its call; the
  driver sends each of that call's frames again, alone, to a live (or
  restarted: actors restart without limit) worker. A frame whose worker
  died ``service.max_frame_attempts`` times is quarantined as having
  crashed it, as the local service does for a frame found in flight at
  that many start-ups.
* A call running past ``service.frame_timeout_s`` per frame has its actor
  killed (Ray can stop a process where a thread cannot be stopped): one
  frame alone is quarantined (``hung``); frames sharing the call are each
  sent again alone, none blamed.
* Bad files and frames are quarantined exactly as locally (one line each),
  a file still being written is retried until ``service.ready_deadline_s``.
* A record-of-truth failure stops the replay (exit 74); nothing unrecorded
  is marked done.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from monitor.config import Config
from monitor.errors import (
    BadInput,
    CellmonitorError,
    ConfigError,
    NotReady,
    Unavailable,
    UsageError,
)
from monitor.records import Acquisition, Counts, Frame, FrameKey
from monitor.service.assemble import FrameAssembler
from monitor.service.ledger import path_text

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


# ---- what crosses the wire ---------------------------------------------------------------

EventKind = Literal["not_ready", "bad", "skip", "assemble", "dropped"]


@dataclass(frozen=True)
class FileEvent:
    """A file (or files) that did not become part of a counted frame, and why."""

    kind: EventKind
    paths: tuple[str, ...]
    problem: str
    key: FrameKey | None = None


@dataclass(frozen=True)
class FrameResult:
    """One frame's outcome: its counts, or the stage that failed (exceptions do not cross the wire)."""

    key: FrameKey
    sources: tuple[Path, ...]
    counts: Counts | None
    stage: str = ""
    problem: str = ""
    incomplete: bool = False


Event = FileEvent | FrameResult


def _placeholder(acq: Acquisition) -> Acquisition:
    """An acquisition's identity without its pixels (1x1 channels), for grouping on the driver."""
    return replace(acq, channels={n: np.zeros((1, 1), np.uint8) for n in acq.channels})


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


# ---- the worker ----------------------------------------------------------------------------


class FrameWorker:
    """One Ray actor: the readers and the pipeline, built once; reads and processes frames.

    A build failure (a plugin, the index, the device) does not raise here:
    :meth:`info` reports it in one line and the driver stops with it.
    """

    def __init__(self, cfg: Config):
        from monitor.protocols import BuildContext
        from monitor.registry import Registry
        from monitor.service.loop import build_pipeline, resolve_device, warm_up
        from monitor.service.reading import build_readers

        logging.basicConfig(level=cfg.service.log_level, format="%(levelname)s %(name)s: %(message)s")
        self.cfg = cfg
        self.failure: str | None = None
        self.classes: tuple[str, ...] = ()
        try:
            registry = Registry(cfg.plugins.paths)
            s = cfg.service
            self.device = resolve_device(cfg.pipeline.device)
            ctx = BuildContext(state_dir=s.state_dir, config_path=cfg.path, device=self.device, extra={"experiment": s.experiment})
            self.readers = build_readers(cfg, registry, ctx)
            self.pipeline = build_pipeline(cfg, registry, ctx)
            warm_up(self.pipeline)
            self.classes = tuple(self.pipeline.classifier.classes)
        except CellmonitorError as e:
            self.failure = str(e)
        except Exception as e:  # a plugin's own bug: still one line on the driver
            self.failure = f"{type(e).__name__}: {e}"

    def info(self) -> dict[str, Any]:
        """Where this worker runs and what it classifies into (or why it could not be built)."""
        from monitor import __version__

        return {"pid": os.getpid(), "host": socket.gethostname(), "classes": self.classes, "failure": self.failure,
                "version": __version__}

    def _read(self, path: str) -> Acquisition | FileEvent:
        """One file, as the service's loop reads it: not ready, unreadable, or its acquisition."""
        p = Path(path)
        try:
            return self.readers.choose(p).read(p)
        except NotReady as e:
            return FileEvent("not_ready", (path,), e.problem)
        except BadInput as e:
            return FileEvent("bad", (path,), e.problem)
        except Exception as e:  # a reader plugin bug costs this file only
            return FileEvent("bad", (path,), f"{type(e).__name__}: {e}")

    def identify(self, paths: Sequence[str]) -> list[Acquisition | FileEvent]:
        """Each file's identity (key, channel names, roles, pixel size), pixels left out."""
        out: list[Acquisition | FileEvent] = []
        for p in paths:
            r = self._read(p)
            out.append(_placeholder(r) if isinstance(r, Acquisition) else r)
        return out

    def _assemble(self, paths: Sequence[str]) -> tuple[list[Event], list[Frame]]:
        """Read one frame's files and assemble them with the service's assembler."""
        a = self.cfg.assembly
        asm = FrameAssembler(a.channels, a.primary, a.control, a.wait_s)
        events: list[Event] = []
        frames: list[Frame] = []
        acqs = [self._read(p) for p in paths]
        waiting = [e for e in acqs if isinstance(e, FileEvent) and e.kind == "not_ready"]
        if waiting:  # the frame waits for all its files
            return list(waiting), []
        for p, acq in zip(paths, acqs, strict=True):
            if isinstance(acq, FileEvent):
                events.append(acq)
                continue
            ignored = asm.stats["ignored_files"]
            pending = set(asm.pending_paths())
            try:
                frame = asm.add(acq)
            except Exception as e:  # resampling a channel must not cost the other frames of the call
                lost = [x for x in pending if x not in set(asm.pending_paths())]
                events.append(FileEvent("assemble", (p, *lost), f"channels could not be assembled: {type(e).__name__}: {e}", acq.key))
                continue
            if asm.stats["ignored_files"] > ignored:
                names = ", ".join(repr(c) for c in acq.channels)
                events.append(FileEvent("skip", (p,), f"channel {names} is not in assembly.channels", acq.key))
            elif frame is not None:
                frames.append(frame)
        before = asm.pending_paths()
        try:
            frames += asm.due(force=True)
        except Exception as e:
            events.append(FileEvent("assemble", tuple(before), f"channels could not be assembled: {type(e).__name__}: {e}"))
        events += [FileEvent("dropped", tuple(map(str, d.sources)), d.reason) for d in asm.take_dropped()]
        return events, frames

    def process(self, units: Sequence[Sequence[str]], keep_calls: bool = False) -> list[list[Event]]:
        """Each unit (one frame's files) read, assembled and processed; crops share encoder calls.

        ``keep_calls``: a sink on the driver draws each cell (the overlay sink), so the counts
        carry the cells' calls and the segmented image back (the one case where pixels return).
        """
        from monitor.errors import StageError
        from monitor.pipeline import process_frames

        if getattr(self.pipeline, "keep_calls", keep_calls) != keep_calls:
            self.pipeline = replace(self.pipeline, keep_calls=keep_calls)

        out: list[list[Event]] = []
        frames: list[Frame] = []
        owner: list[int] = []
        for i, paths in enumerate(units):
            events, fs = self._assemble(paths)
            out.append(events)
            frames += fs
            owner += [i] * len(fs)
        if not frames:
            return out
        try:
            results: list[Counts | StageError] = process_frames(frames, self.pipeline)
        except Exception as e:  # process_frames isolates frames and stages; a last resort
            results = [StageError("process", e)] * len(frames)
        for i, f, r in zip(owner, frames, results, strict=True):
            incomplete = bool(f.missing_channels)
            if isinstance(r, StageError):
                out[i].append(FrameResult(f.key, f.sources, None, r.stage, f"{type(r.cause).__name__}: {r.cause}", incomplete))
            else:
                out[i].append(FrameResult(f.key, f.sources, r, incomplete=incomplete))
        return out


# ---- the driver ----------------------------------------------------------------------------


@dataclass
class _Unit:
    """One frame's files, in the order the local replay records them."""

    seq: int
    paths: tuple[str, ...]
    first_try: float = field(default_factory=time.monotonic)
    solo: bool = False
    attempts: int = 0
    tries: int = 0  # not-ready retries
    not_before: float = 0.0


class _Queue:
    """Units to send: due ones in order (O(1) at both ends), and ones waiting for a retry time."""

    def __init__(self, units: Sequence[_Unit] = ()):
        self.due: deque[_Unit] = deque(units)
        self.waiting: list[_Unit] = []

    def __len__(self) -> int:
        return len(self.due) + len(self.waiting)

    def front(self, u: _Unit) -> None:
        """Next to go (a unit sent again)."""
        self.due.appendleft(u)

    def later(self, u: _Unit) -> None:
        """Not before ``u.not_before``."""
        self.waiting.append(u)

    def take(self, n: int, now: float) -> list[_Unit]:
        """The next call: a unit that goes alone, or up to ``n`` units in order."""
        if self.waiting:
            back = [u for u in self.waiting if u.not_before <= now]
            self.waiting = [u for u in self.waiting if u.not_before > now]
            self.due.extendleft(reversed(back))
        if not self.due:
            return []
        if self.due[0].solo:
            return [self.due.popleft()]
        batch: list[_Unit] = []
        while self.due and len(batch) < n and not self.due[0].solo:
            batch.append(self.due.popleft())
        return batch


@dataclass
class _Call:
    actor: int
    units: list[Any]
    t0: float
    timed_out: bool = False
    innocent: bool = False  # queued behind the call that lost its actor: uses no attempt
    probe: bool = False  # an ``info`` call: is the (restarted) actor back?


@dataclass
class ReplayStats:
    """What a cluster replay did (for the log line, the tests and the benchmark)."""

    workers: int = 0
    files: int = 0
    frames: int = 0
    resubmitted: int = 0
    actor_pids: list[int] = field(default_factory=list)
    startup_s: float = 0.0  # connect, workers built (models and index loaded), sinks opened
    seconds: float = 0.0


class _Pool:
    """The actors and the calls in flight; at most ``depth`` calls queued per actor.

    Ray runs an actor's calls one after another, so when an actor dies only
    its oldest call was running: that call's frames use an attempt, the
    calls queued behind it do not. A lost actor gets no work until a probe
    shows it restarted (with the pipeline rebuilt).
    """

    def __init__(self, ray: ModuleType, actors: list[Any], stats: ReplayStats, depth: int = 2):
        self.ray = ray
        self.actors = actors
        self.stats = stats
        self.depth = depth
        self.load = [0] * len(actors)
        self.down = [False] * len(actors)
        self.busy_since = [0.0] * len(actors)  # when the actor's oldest call began to run
        self.inflight: dict[Any, _Call] = {}

    @property
    def working(self) -> bool:
        """Some call other than a probe is in flight."""
        return any(not c.probe for c in self.inflight.values())

    def free(self) -> int | None:
        """The least loaded live actor with room for a call, or None."""
        up = [j for j in range(len(self.actors)) if not self.down[j]]
        if not up:
            return None
        i = min(up, key=lambda j: self.load[j])
        return i if self.load[i] < self.depth else None

    def submit(self, method: str, units: list[Any], *args: Any) -> None:
        i = self.free()
        assert i is not None
        self._send(i, method, units, *args)

    def _send(self, i: int, method: str, units: list[Any], *args: Any, probe: bool = False) -> None:
        ref = getattr(self.actors[i], method).remote(*args)
        now = time.monotonic()
        if self.load[i] == 0:
            self.busy_since[i] = now
        self.inflight[ref] = _Call(i, units, now, probe=probe)
        self.load[i] += 1

    def _oldest(self, i: int) -> _Call | None:
        calls = [c for c in self.inflight.values() if c.actor == i]
        return min(calls, key=lambda c: c.t0) if calls else None

    def _lose(self, i: int, blamed: _Call | None) -> None:
        """Actor ``i`` died: only ``blamed`` (its running call) is at fault; probe for the restart."""
        if self.down[i]:
            return
        self.down[i] = True
        for c in self.inflight.values():
            if c.actor == i and c is not blamed:
                c.innocent = True
        self._send(i, "info", [], probe=True)

    def wait(self, timeout: float) -> list[tuple[_Call, Any, BaseException | None]]:
        """Finished work calls: (call, result, None) or (call, None, the error that lost it)."""
        if not self.inflight:
            time.sleep(min(timeout, 0.05))  # only units waiting for a retry
            return []
        ready, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=timeout, fetch_local=True)
        out: list[tuple[_Call, Any, BaseException | None]] = []
        for ref in sorted(ready, key=lambda r: self.inflight[r].t0):
            call = self.inflight.pop(ref)
            i = call.actor
            self.load[i] -= 1
            self.busy_since[i] = time.monotonic()
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                if call.probe:
                    if isinstance(e, self.ray.exceptions.ActorDiedError):  # not restarting (node gone, restarts spent)
                        log.error("worker %d is gone for good (%s)", i, " ".join(str(e).split())[:200])
                        if all(self.down):
                            raise Unavailable(f"every Ray worker is gone ({' '.join(str(e).split())[:200]})") from None
                        continue
                    time.sleep(0.2)
                    self._send(i, "info", [], probe=True)
                    continue
                if not isinstance(e, self.ray.exceptions.RayTaskError):  # the actor died, not the call's code
                    oldest = self._oldest(i)
                    blamed = call if oldest is None or call.t0 <= oldest.t0 else oldest
                    call.innocent = call.innocent or blamed is not call or self.down[i]
                    self._lose(i, blamed)
                out.append((call, None, e))
                continue
            if call.probe:
                self.down[i] = False
                self.stats.actor_pids[i] = int(result["pid"])
                log.info("worker %d is back (pid %d)", i, result["pid"])
                continue
            out.append((call, result, None))
        return out

    def kill_overdue(self, limit_s: float) -> None:
        """Kill (Ray restarts it) an actor whose running call is past ``limit_s`` per frame."""
        now = time.monotonic()
        for i in range(len(self.actors)):
            call = self._oldest(i)
            if call is None or call.probe or call.timed_out or self.down[i]:
                continue
            if now - max(call.t0, self.busy_since[i]) > limit_s * max(1, len(call.units)):
                call.timed_out = True
                log.error("a call of %d frame(s) on worker %d still running after %.0fs (service.frame_timeout_s = %g each); killing the worker",
                          len(call.units), i, now - max(call.t0, self.busy_since[i]), limit_s)
                self.ray.kill(self.actors[i], no_restart=False)
                self._lose(i, call)


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
        from monitor import __version__

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
        from prometheus_client import CollectorRegistry

        from monitor import __version__
        from monitor.protocols import BuildContext
        from monitor.service.ledger import Ledger
        from monitor.service.loop import roles_for
        from monitor.service.metrics import ServiceMetrics, serve
        from monitor.service.recording import Recorder

        cfg, s = self.cfg, self.cfg.service
        self.metrics = metrics = ServiceMetrics(CollectorRegistry(), __version__)
        roles = roles_for(cfg, self.classes)
        metrics.roles = roles
        ctx = BuildContext(state_dir=s.state_dir, config_path=cfg.path, metrics=metrics, device="cpu",
                           extra={"experiment": s.experiment, "roles": roles})
        sinks = [self.registry.build("sinks", ref, ctx, cfg.source_name, f"sinks.{i}") for i, ref in enumerate(cfg.sinks)]
        self.keep_calls = any(getattr(k, "wants_calls", False) for k in sinks)  # e.g. the overlay sink
        self.recorder = Recorder(sinks, Ledger(s.state_dir / "ledger.sqlite"), metrics, s.state_dir / "quarantine.csv", roles)
        for sink in sinks:  # the dashboard shows every well's last state straight after a restart
            if getattr(sink, "record_of_truth", False) and isinstance(getattr(sink, "path", None), Path):
                metrics.restore(sink.path)
        if self.serve_metrics and s.metrics_port:
            self.server = serve(metrics.registry, s.metrics_port, s.metrics_addr)
            log.info("metrics at http://%s:%d/metrics", s.metrics_addr, s.metrics_port)

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
        from monitor.service.ledger import StateLock
        from monitor.service.loop import check_watch_dir, stop_server

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
            pool = _Pool(ray, actors, self.stats)
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
        from monitor.service.watch import FileTracker, Intake

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

    def _units(self, pool: _Pool, files: list[str], solo: set[str], stop: threading.Event) -> list[_Unit]:
        """Files grouped into frames (one file each without ``[assembly] channels``), in local order;
        frames a previous run left in flight (``solo``) go alone."""
        groups = self._group(pool, files, stop) if self.cfg.assembly.channels else [(f,) for f in files]
        return [_Unit(i, g, solo=any(p in solo for p in g)) for i, g in enumerate(groups)]

    def _group(self, pool: _Pool, files: list[str], stop: threading.Event) -> list[tuple[str, ...]]:
        """Workers decode identities; the service's assembler groups them here, as it would locally."""
        ident: dict[str, Acquisition | FileEvent] = {}
        todo = _Queue([_Unit(i, (f,)) for i, f in enumerate(files)])
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
        a = self.cfg.assembly
        asm = FrameAssembler(a.channels, a.primary, a.control, a.wait_s)
        groups: list[tuple[str, ...]] = []
        for f in files:
            r = ident.get(f)
            if r is None:
                continue  # stopped, or lost: the next replay takes it
            if isinstance(r, FileEvent):
                self._apply([r])
                continue
            p = Path(f)
            if not self.recorder.note_read(p, r.key):
                continue
            ignored = asm.stats["ignored_files"]
            frame = asm.add(r)
            if asm.stats["ignored_files"] > ignored:
                names = ", ".join(repr(c) for c in r.channels)
                self.recorder.skip(p, f"channel {names} is not in assembly.channels", r.key)
            elif frame is not None:
                groups.append(tuple(map(str, frame.sources)))
        groups += [tuple(map(str, fr.sources)) for fr in asm.due(force=True)]
        for d in asm.take_dropped():
            self.metrics.frames.labels("dropped").inc()
            self.recorder.quarantine(list(d.sources), "assemble", d.reason)
        return groups

    def _give_up(self, u: _Unit, ev: FileEvent) -> bool:
        """A file still being written: retried with back-off, quarantined after ``ready_deadline_s``."""
        s = self.cfg.service
        if time.monotonic() - u.first_try >= s.ready_deadline_s:
            for p in ev.paths:
                self.recorder.quarantine([p], "read", f"still unreadable after {s.ready_deadline_s:.0f}s: {ev.problem}")
            return True
        if u.tries == 0:
            log.info("%s: not ready (%s); waiting up to %.0f s for it to be complete", ev.paths[0], ev.problem, s.ready_deadline_s)
        u.tries += 1
        u.not_before = time.monotonic() + min(60.0, 0.5 * 2 ** min(u.tries, 8))
        return False

    def _lost(self, u: _Unit, err: BaseException | None, queue: _Queue, call: _Call | None = None) -> bool:
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

    def _process(self, pool: _Pool, units: list[_Unit], stop: threading.Event) -> None:
        """Ship units to the workers; record results in unit order as they come back."""
        fpc = max(1, self.cfg.pipeline.frames_per_call)
        window = self.window or 4 * len(pool.actors) * fpc
        todo = _Queue(units)
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
                            todo.front(replace(u, paths=rest, not_before=0.0))
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
        """One unit's outcome into the ledger, the sinks and the quarantine, as the local loop records it."""
        rec, ledger, metrics = self.recorder, self.recorder.ledger, self.metrics
        for ev in events:
            if isinstance(ev, FileEvent):
                if ev.kind == "skip":
                    rec.skip(Path(ev.paths[0]), ev.problem, ev.key)
                elif ev.kind == "assemble":
                    metrics.errors.labels("assemble").inc()
                    rec.quarantine(list(ev.paths), "assemble", ev.problem, ev.key)
                elif ev.kind == "dropped":
                    metrics.frames.labels("dropped").inc()
                    rec.quarantine(list(ev.paths), "assemble", ev.problem)
                else:  # "bad" (a "not_ready" never gets here)
                    rec.quarantine(list(ev.paths), "read", ev.problem)
                continue
            if ev.incomplete:
                metrics.frames.labels("incomplete").inc()
            if ev.counts is None:
                metrics.errors.labels(ev.stage).inc()
                rec.quarantine(list(ev.sources), ev.stage, ev.problem, ev.key)
                continue
            if ledger.frame_done(ev.key):
                log.info("frame %s already recorded; ignoring %s", ev.key, ", ".join(path_text(p) for p in ev.sources))
                ledger.mark_files(list(ev.sources), "done", ev.key)
                continue
            c = ev.counts
            # the Recorder takes the frame for its key and files; its pixels stayed on the worker
            frame = Frame(key=ev.key, channels={}, primary="", control=None, pixel_size_um=c.pixel_size_um,
                          pixel_size_source=c.pixel_size_source, instrument=c.instrument, acquired_at=c.acquired_at,
                          sources=ev.sources, missing_channels=c.missing_channels)
            if rec.record(frame, c):
                self.stats.frames += 1
                if self.on_counts is not None:
                    self.on_counts(c)
                if self.on_recorded is not None:
                    self.on_recorded(self.stats)
