"""``cellmonitor inspect FILE`` and ``cellmonitor plugins check FILE``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print what a reader parsed from a file (instrument, well, channel, pixel size, ...)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--config", type=Path, help="config with reader options (pixel sizes, patterns)")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.set_defaults(func=_inspect)


def register_check(psub: argparse._SubParsersAction) -> None:
    p = psub.add_parser("check", help="which reader takes a file, and why the others declined")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--config", type=Path)
    p.set_defaults(func=_check)


def _readers(config: Path | None):  # type: ignore[no-untyped-def]
    from monitor.cli_service import config_or_default
    from monitor.protocols import BuildContext
    from monitor.reading import build_readers
    from monitor.registry import Registry

    cfg = config_or_default(config)
    reg = Registry(cfg.plugins.paths)
    ctx = BuildContext(state_dir=cfg.service.state_dir, extra={"experiment": cfg.service.experiment})
    return build_readers(cfg, reg, ctx)


def describe(acq: Any, reader: str) -> dict[str, Any]:
    return {
        "file": str(acq.path),
        "reader": reader,
        "instrument": acq.instrument,
        "experiment": acq.key.experiment,
        "well": acq.key.well,
        "field": acq.key.field,
        "timepoint": acq.key.timepoint,
        "acquired_at": acq.acquired_at.isoformat() if acq.acquired_at else None,
        "channels": {
            name: {"shape": list(img.shape), "dtype": str(img.dtype)} for name, img in acq.channels.items()
        },
        "pixel_size_um": acq.pixel_size_um,
        "pixel_size_source": acq.pixel_size_source,
        "metadata": dict(acq.metadata),
    }


def _inspect(args: argparse.Namespace) -> int:
    from monitor.errors import BadInput

    readers = _readers(args.config)
    status = 0
    for f in args.files:
        try:
            r = readers.choose(f)
            info = describe(r.read(f), r.name)
        except BadInput as e:
            print(f"cellmonitor: error: {e}", flush=True)
            status = 65
            continue
        if args.json:
            print(json.dumps(info))
            continue
        print(f"{info['file']}")
        for k in ("reader", "instrument", "experiment", "well", "field", "timepoint", "acquired_at"):
            print(f"  {k:<18} {info[k]}")
        for name, c in info["channels"].items():
            print(f"  channel            {name}: {'x'.join(map(str, c['shape']))} {c['dtype']}")
        print(f"  pixel_size_um      {info['pixel_size_um']:.4f} (from {info['pixel_size_source']})")
        for k, v in info["metadata"].items():
            print(f"  {k:<18} {v}")
    return status


def _check(args: argparse.Namespace) -> int:
    readers = _readers(args.config)
    status = 0
    for f in args.files:
        print(f"{f}")
        taken = None
        for name, why in readers.explain(f):
            if why is None and taken is None:
                taken = name
                print(f"  {name:<10} TAKES this file")
            elif why is None:
                print(f"  {name:<10} would accept, but {taken} is more specific")
            else:
                print(f"  {name:<10} declined: {why}")
        if taken is None:
            status = 65
    return status
