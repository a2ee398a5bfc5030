"""``cellmonitor report`` (the run report) and ``cellmonitor overlay`` (cells outlined by state)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` and ``overlay`` subcommands."""
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page per experiment: time courses, control vs death, plate map, cell gallery, overlays",
        description=(
            "Build the run report from the counts CSV. Given the service's CONFIG, the CSV is the one its csv sink writes, "
            "and a few frames per well are re-read from the watch folder and re-classified with the config's pipeline "
            "for the cell gallery and the overlays. Given a COUNTS.csv alone, the report has every figure but no gallery."
        ),
    )
    p.add_argument("source", type=Path, metavar="CONFIG|COUNTS.csv")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for <experiment>.html, data/ and overlays/")
    p.add_argument("--config", type=Path, default=None, metavar="CONFIG", help="with a COUNTS.csv: the config whose pipeline and watch folder make the gallery")
    p.add_argument("--frames-per-well", type=int, default=3, help="frames per well re-classified for overlays and the gallery (default 3)")
    p.add_argument("--per-state", type=int, default=8, help="gallery crops per state and timepoint range (default 8)")
    p.add_argument("--death-states", type=_csv, default=None, help="canonical states counted as death (default apoptotic,dead)")
    p.add_argument("--no-gallery", action="store_true", help="figures only: do not re-read frames")
    p.set_defaults(func=_report)

    o = sub.add_parser(
        "overlay",
        help="draw each cell's outline coloured by its state, with a scale bar and a legend",
        description="Read FRAME with the configured reader, segment, crop, embed and classify it as the service does, and draw the result.",
    )
    o.add_argument("frames", type=Path, nargs="+", metavar="FRAME")
    o.add_argument("--config", type=Path, default=None, metavar="CONFIG", help="config (readers, segmenter, encoders, index)")
    o.add_argument("--out", type=Path, required=True, metavar="PNG|DIR", help="the PNG (one FRAME) or a folder (several: <name>.overlay.png)")
    o.set_defaults(func=_overlay)


def _built(cfg: Any) -> tuple[Any, Any, dict[str, str]]:
    """(pipeline, readers, roles) as the service builds them from ``cfg`` (index loaded)."""
    from monitor.intake.readers import build_readers
    from monitor.protocols import context_from
    from monitor.registry import Registry
    from monitor.service.wiring import build_pipeline, roles_for

    reg = Registry(cfg.plugins.paths)
    ctx = context_from(cfg)
    readers = build_readers(cfg, reg, ctx)
    pipeline = build_pipeline(cfg, reg, ctx)
    return pipeline, readers, roles_for(cfg, pipeline.classifier.classes)


def _report(args: argparse.Namespace) -> int:
    from monitor.config import load_config
    from monitor.errors import BadInput, CellmonitorError, NoInput, UsageError
    from monitor.report.build import build_report, counts_path
    from monitor.report.data import DEATH_STATES
    from monitor.service.rows import CANONICAL

    if args.frames_per_well < 0 or args.per_state < 0:
        raise UsageError("--frames-per-well and --per-state must be 0 or more")
    death = tuple(args.death_states or DEATH_STATES)
    unknown = [s for s in death if s not in CANONICAL]
    if unknown:
        raise UsageError(f"--death-states: {', '.join(unknown)} not a canonical state ({', '.join(CANONICAL)})")
    src: Path = args.source
    if not src.is_file():
        raise NoInput(src)
    config_path = args.config
    if src.suffix.lower() == ".toml":
        config_path = src
    if config_path is not None and not config_path.is_file():
        raise NoInput(config_path)
    cfg = load_config(config_path) if config_path is not None else None
    counts = src if src.suffix.lower() != ".toml" else counts_path(cfg)
    if not counts.is_file():
        raise BadInput(config_path or src, f"no counts CSV at {counts} (has the service counted anything yet?)")
    pipeline = readers = roles = None
    reason = None
    if args.no_gallery:
        reason = "--no-gallery was given"
    elif cfg is None:
        reason = "built from the CSV alone, without the service's config (the frames and the pipeline are unknown)"
    else:
        try:
            pipeline, readers, roles = _built(cfg)
        except CellmonitorError as e:  # figures are still worth having
            reason = f"the config's pipeline could not be built ({e})"
            log.warning("report without gallery: %s", reason)
    res = build_report(counts, args.out, cfg, pipeline, readers, no_gallery=reason, frames_per_well=args.frames_per_well,
                       per_state=args.per_state, death_states=death, roles=roles)
    for p in res.pages:
        print(p)
    if res.no_gallery:
        print(f"no gallery: {res.no_gallery}", file=sys.stderr)
    else:
        print(f"{res.frames} frame(s) re-classified for the gallery and overlays"
              + (f"; {res.mismatched} differ from the CSV (index or config changed since)" if res.mismatched else ""), file=sys.stderr)
    return 0


def _overlay(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    from monitor.config import config_or_default
    from monitor.errors import BadInput, CellmonitorError
    from monitor.report.cells import call_cells, read_frame
    from monitor.report.overlay import draw_overlay

    many = len(args.frames) > 1
    out: Path = args.out
    if many:
        if out.exists() and not out.is_dir():
            raise BadInput(out, "several frames need a folder for --out; this is a file")
        out.mkdir(parents=True, exist_ok=True)
    elif not out.parent.is_dir():
        raise BadInput(out, "output folder does not exist")
    cfg = config_or_default(args.config)
    pipeline, readers, roles = _built(cfg)
    status = 0
    for path in tqdm(args.frames, desc="overlay", unit="frame", file=sys.stderr, disable=None):
        try:
            frame = read_frame([path], cfg, readers)
            calls = call_cells(frame, pipeline)
        except CellmonitorError as e:
            print(f"cellmonitor: error: {e}", file=sys.stderr)
            status = status or e.exit_status
            continue
        st = calls.states
        img = draw_overlay(calls.frame.image, calls.cells.labels, st.predicted, st.classes, calls.frame.pixel_size_um,
                           cell_ids=[c.id for c in calls.cells.cells], uncertain=st.uncertain, unknown=st.unknown, roles=roles, title=path.name)
        dest = out / f"{path.stem}.overlay.png" if many else out
        if not cv2.imwrite(str(dest), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise BadInput(dest, "cannot write the PNG (is the suffix .png?)")
        counts = ", ".join(f"{k} {v}" for k, v in calls.counts().items())
        print(f"{path}: {len(calls.cells)} cells ({counts}) -> {dest}")
    return status
