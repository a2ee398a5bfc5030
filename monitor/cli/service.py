"""Service commands: ``run``, ``replay``, ``check-config``, ``export``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the monitoring service on a config (watch, classify, record)")
    p.add_argument("config", type=Path, metavar="CONFIG")
    p.set_defaults(func=_run)

    p = sub.add_parser("replay", help="process every frame already in a folder through the service, then exit")
    p.add_argument("config", type=Path, metavar="CONFIG")
    p.add_argument("--input", type=Path, help="folder to replay (default: service.watch_dir)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics while replaying")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: a Ray cluster's workers read and process, this process records (pip install 'cellmonitor[cluster]')")
    p.add_argument("--address", help="--engine ray: a running Ray cluster (e.g. HEAD:6379, as `ray start --head` prints); default: start a local one")
    p.add_argument("--workers", type=int, help="--engine ray: number of workers (default: as many as the cluster's CPUs, or GPUs, allow)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="--engine ray: CPUs each worker reserves (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="--engine ray: GPUs each worker reserves (e.g. 1 on a GPU node pool; default 0)")
    p.set_defaults(func=_replay)

    p = sub.add_parser("check-config", help="validate a config, every plugin's options, the watch folder and the index (exit 78 / 69 on problems)")
    p.add_argument("config", type=Path, metavar="CONFIG")
    p.add_argument("--index", action="store_true", help="also load the whole pipeline (segmenter, encoders, index) as run does")
    p.add_argument("--no-index", action="store_true", help="skip building the encoders to check the index's encoder ids")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("export", help="post-run export of the counts CSV, sorted: wide or long (tidy) CSV, or Parquet")
    p.add_argument("counts", type=Path, metavar="COUNTS_CSV_OR_CONFIG")
    p.add_argument("--out", type=Path, required=True, help="a CSV file; with --format parquet a folder (one <experiment>.parquet each)")
    p.add_argument("--format", choices=("wide", "long", "parquet"), default="wide")
    p.add_argument("--cells", type=Path, metavar="OUT", help="also gather the per-cell table (the cells sink's files under "
                   "state_dir/cells; CONFIG given) into one file: .parquet or .csv by its suffix")
    p.add_argument("--fates", type=Path, metavar="DIR", help="also write tracks and fates as Parquet into DIR (CONFIG given): "
                   "tracks (per cell: track, smoothed state), fates (per track: onset of apoptosis, time of death), "
                   "smoothed_counts, survival (per well) and, with [tracking] plate_map, dose_response")
    p.set_defaults(func=_export)


def _stop_on_signals(what: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT (when called on the main thread), logging ``what``."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: %s", signum, what)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    return stop


def _serve(cfg: Any, until_idle: bool, serve_metrics: bool = True, args: argparse.Namespace | None = None) -> int:
    from monitor.registry import Registry
    from monitor.service.wiring import build_service, stop_server

    if args is None or not (getattr(args, "verbose", False) or getattr(args, "quiet", False)):
        logging.getLogger().setLevel(cfg.service.log_level)  # -v / -q on the command line win
    registry = Registry(cfg.plugins.paths)
    problems = registry.validate_config(cfg)
    if problems:
        from monitor.errors import ConfigError

        raise ConfigError(problems)
    service, server = build_service(cfg, registry, serve_metrics=serve_metrics)
    service.exit_on_hang = True  # a stuck native call cannot be cancelled: quarantine the frame, exit 75, restart
    stop = _stop_on_signals("stopping after the current frame")
    try:
        if until_idle:
            from monitor.intake.files import scan

            total = sum(1 for _ in scan(cfg.service.watch_dir, cfg.service.patterns, cfg.service.recursive))
            progress = _Progress(total)
            service.on_counts = progress.update
            service.run(stop, until_idle=True, observe=False)
            progress.close()
        else:
            service.run(stop)
    finally:
        service.close()
        stop_server(server)
    log.info("stopped: %d frame(s) counted, %d problem(s)%s", service.counted, service.failed,
             f" (see {service.recorder.quarantine_csv})" if service.recorder.quarantine_csv.exists() else "")
    return 0


class _Progress:
    """Replay progress on stderr: frames counted against files found, and frames per second."""

    def __init__(self, total_files: int):
        import time

        from tqdm import tqdm

        self.bar = tqdm(total=total_files, unit="file", desc="replay", file=sys.stderr, disable=None)
        self.clock = time.monotonic
        self.t0 = self.clock()
        self.frames = 0

    def update(self, counts: Any) -> None:
        self.frames += 1
        self.bar.update(len(counts.sources))
        rate = self.frames / max(1e-9, self.clock() - self.t0)
        self.bar.set_postfix_str(f"{counts.key} {counts.n_cells} cells, {rate:.1f} frames/s")

    def close(self) -> None:
        self.bar.close()


def _run(args: argparse.Namespace) -> int:
    from monitor.config import load_config

    return _serve(load_config(args.config), until_idle=False, args=args)


def _replay(args: argparse.Namespace) -> int:
    from monitor.config import load_config

    cfg = load_config(args.config)
    if args.input is not None:
        cfg = cfg.model_copy(update={"service": cfg.service.model_copy(update={"watch_dir": args.input})})
    if args.engine == "ray":
        return _replay_ray(cfg, args)
    return _serve(cfg, until_idle=True, serve_metrics=not args.no_metrics, args=args)


def _replay_ray(cfg: Any, args: argparse.Namespace) -> int:
    """``replay --engine ray``: Ray workers read and process, this process records (monitor.service.cluster)."""
    from monitor.errors import ConfigError, UsageError
    from monitor.intake.files import scan
    from monitor.registry import Registry
    from monitor.service.cluster import ClusterReplay

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    if args.cpus_per_worker < 0 or args.gpus_per_worker < 0:
        raise UsageError("--cpus-per-worker and --gpus-per-worker cannot be negative")
    if not (getattr(args, "verbose", False) or getattr(args, "quiet", False)):
        logging.getLogger().setLevel(cfg.service.log_level)
    registry = Registry(cfg.plugins.paths)
    problems = registry.validate_config(cfg)
    if problems:
        raise ConfigError(problems)
    total = sum(1 for _ in scan(cfg.service.watch_dir, cfg.service.patterns, cfg.service.recursive))
    progress = _Progress(total)
    engine = ClusterReplay(cfg, registry, workers=args.workers, address=args.address, cpus_per_worker=args.cpus_per_worker,
                           gpus_per_worker=args.gpus_per_worker, serve_metrics=not args.no_metrics, on_counts=progress.update)
    stop = _stop_on_signals("stopping after the frames in flight")
    try:
        stats = engine.run(stop)
    finally:
        progress.close()
    rec = engine.recorder
    q = cfg.service.state_dir / "quarantine.csv"
    log.info("stopped: %d frame(s) counted on %d Ray worker(s) in %.1fs, %d problem(s)%s",
             stats.frames, stats.workers, stats.seconds, rec.failed if rec else 0, f" (see {q})" if q.exists() else "")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    """Everything ``run`` would refuse at start-up, without loading models (``--index`` loads them).

    Configuration problems (options, a missing index folder) exit 78; a
    missing watch folder alone exits 69, as ``run`` does.
    """
    from monitor.config import load_config
    from monitor.errors import ConfigError, Unavailable
    from monitor.registry import Registry

    cfg = load_config(args.config)
    registry = Registry(cfg.plugins.paths)
    problems = list(registry.validate_config(cfg))
    index = cfg.classifier.index
    if not (index / "meta.json").is_file():
        problems.append(f"{cfg.source_name}: classifier.index: {index}: not an index folder (no meta.json; build one with `cellmonitor index build`)")
    if not problems and not args.no_index:
        problems += _index_problems(cfg, registry)
    problems += _port_problems(cfg)
    watch_missing = not cfg.service.watch_dir.is_dir()
    if problems:
        if watch_missing:
            problems.append(f"{cfg.source_name}: service.watch_dir: {cfg.service.watch_dir}: no such folder (is the export share mounted?)")
        raise ConfigError(problems)
    if watch_missing:
        raise Unavailable(f"{cfg.source_name}: service.watch_dir: {cfg.service.watch_dir}: no such folder (is the export share mounted?)")
    if cfg.tracking.plate_map is not None:  # never fatal: the service runs on and re-reads the map when it changes
        from monitor.fate.platemap import parse_plate_map

        if not cfg.tracking.plate_map.is_file():
            print(f"{cfg.source_name}: tracking.plate_map: {cfg.tracking.plate_map}: no such file (no dose response until it is there)", file=sys.stderr)
        else:
            for line in parse_plate_map(cfg.tracking.plate_map).errors:
                print(f"plate map: {line}", file=sys.stderr)
    if args.index:
        from monitor.protocols import context_from
        from monitor.service.wiring import build_pipeline

        ctx = context_from(cfg)
        p = build_pipeline(cfg, registry, ctx)
        print(f"{args.config}: index {cfg.classifier.index} ({len(p.classifier.index)} references) matches the pipeline")  # type: ignore[attr-defined]
    print(f"{args.config}: OK")
    return 0


def _index_problems(cfg: Any, registry: Any) -> list[str]:
    """The index against the config's encoders, as ``run`` checks it (encoders built, no segmenter):
    one line naming the fix when they differ."""
    from monitor.errors import CellmonitorError
    from monitor.index.ewc import params_from_config
    from monitor.protocols import context_from
    from monitor.service.wiring import build_encoders, load_index

    try:
        index = load_index(cfg, build_encoders(cfg, registry, context_from(cfg, device="cpu")))
        c = cfg.classifier
        params_from_config(index, c.k_min, c.k_max, c.entropy_threshold, c.reweight)  # the EWC range run would use
    except CellmonitorError as e:
        return [f"{cfg.source_name}: classifier.index: {line}" for line in e.lines] if hasattr(e, "lines") else [f"{cfg.source_name}: classifier.index: {e}"]
    return []


def _port_problems(cfg: Any) -> list[str]:
    """The metrics port can be bound (``run`` refuses to start when it cannot)."""
    import socket

    s = cfg.service
    if not s.metrics_port:
        return []
    family = socket.AF_INET6 if ":" in s.metrics_addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((s.metrics_addr, s.metrics_port))
    except OSError as e:
        return [f"{cfg.source_name}: service.metrics_port: {s.metrics_addr}:{s.metrics_port} cannot be bound ({e.strerror or e}); "
                "another cellmonitor or exporter holds it? set another port, or 0 for none"]
    return []


def _export(args: argparse.Namespace) -> int:
    from monitor.errors import NoInput
    from monitor.service.rows import export_csv

    src = args.counts
    cells_dir = None
    cfg = None
    if src.suffix == ".toml":
        from monitor.config import load_config

        cfg = load_config(src)
        src = cfg.service.state_dir / "counts.csv"
        cells_dir = next((Path(r.options["folder"]) for r in cfg.sinks if r.name == "cells" and r.options.get("folder")),
                         cfg.service.state_dir / "cells")
    if not src.is_file():
        raise NoInput(src, "counts CSV not found")
    n = export_csv(src, args.out, args.format)
    what = f"{n} rows to {args.out}" + (" (one .parquet per experiment)" if args.format == "parquet" else "")
    print(f"wrote {what}")
    if args.cells is not None:
        from cellmonitor_plugins.sinks.cells import read_cells

        from monitor.errors import UsageError

        if cells_dir is None:
            raise UsageError("--cells needs the config (COUNTS_CSV_OR_CONFIG as a .toml): it says where the cells sink writes")
        if not cells_dir.is_dir():
            raise NoInput(cells_dir, "no per-cell table here (is the cells sink in the config's [[sinks]]?)")
        df = read_cells(cells_dir)
        if args.cells.suffix.lower() == ".csv":
            df.to_csv(args.cells, index=False)
        else:
            df.to_parquet(args.cells, index=False)
        print(f"wrote {len(df)} cells to {args.cells}")
    if args.fates is not None:
        _export_fates(args.fates, cfg, cells_dir)
    return 0


def _export_fates(out: Path, cfg: Any, cells_dir: Path | None) -> None:
    """Tracks and fates as Parquet files in ``out`` (monitor.fate.fates.fate_tables)."""
    from cellmonitor_plugins.sinks.cells import read_cells

    from monitor.errors import NoInput, UsageError
    from monitor.fate.fates import fate_tables
    from monitor.fate.platemap import parse_plate_map

    if cfg is None or cells_dir is None:
        raise UsageError("--fates needs the config (COUNTS_CSV_OR_CONFIG as a .toml): it says where the cells sink writes")
    if not cells_dir.is_dir():
        raise NoInput(cells_dir, "no per-cell table here (is the cells sink in the config's [[sinks]]?)")
    cells = read_cells(cells_dir)
    if "track_id" not in cells:
        raise NoInput(cells_dir, "the per-cell rows carry no track_id (was [tracking] enabled = false?)")
    plate = None
    if cfg.tracking.plate_map is not None:
        plate = parse_plate_map(cfg.tracking.plate_map)
        for line in plate.errors:
            print(f"plate map: {line}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in fate_tables(cells, cfg.tracking, plate).items():
        df.to_parquet(out / f"{name}.parquet", index=False)
        print(f"wrote {len(df)} rows to {out / (name + '.parquet')}")
