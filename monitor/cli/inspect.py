"""``cellmonitor inspect FILE``: what a reader parsed from a file.

It builds the readers exactly as the service does (from ``--config`` or the
defaults) so what they print is what the service will see. A file that
cannot be read is one line on stderr, ``cellmonitor: error: PATH: problem``,
and the remaining files are still inspected. Exit status: 0 when every file
was read, 66 (EX_NOINPUT) when a named file does not exist (as in every
command), 75 (EX_TEMPFAIL) when the only other failures were files still
being written, 65 (EX_DATAERR) otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from monitor.cli.common import (
    EX_DATAERR,
    EX_NOINPUT,
    EX_TEMPFAIL,
    one_line_error,
    readers_from_config,
)

log = logging.getLogger(__name__)


#: the rows ``inspect`` prints, in order, with their labels
FIELDS = (
    ("reader", "reader"),
    ("instrument", "instrument"),
    ("experiment", "experiment"),
    ("plate", "plate"),
    ("well", "well"),
    ("field", "field"),
    ("timepoint", "timepoint index"),
    ("acquired_at", "acquired at"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print what a reader parsed from a file (instrument, plate, well, channel, pixel size, ...)",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--config", type=Path, metavar="CONFIG", help="config with reader options (pixel sizes, patterns)")
    p.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    p.set_defaults(func=_inspect)


def describe(acq: Any, reader: str) -> dict[str, Any]:
    """Everything ``inspect`` reports about one acquisition, JSON-ready."""
    meta = dict(acq.metadata)
    return {
        "file": str(acq.path),
        "reader": reader,
        "instrument": acq.instrument,
        "experiment": acq.key.experiment,
        "plate": meta.get("plate"),
        "well": acq.key.well,
        "field": acq.key.field,
        "timepoint": acq.key.timepoint,
        "acquired_at": acq.acquired_at.isoformat() if acq.acquired_at else None,
        "channels": {
            name: {"shape": list(img.shape), "dtype": str(img.dtype), "role": acq.roles.get(name)} for name, img in acq.channels.items()
        },
        "pixel_size_um": acq.pixel_size_um,
        "pixel_size_source": acq.pixel_size_source,
        "metadata": meta,
    }


def format_description(info: dict[str, Any]) -> list[str]:
    """The human-readable lines of ``inspect`` for one file."""
    lines = [info["file"]]
    for key, label in FIELDS:
        v = info.get(key)
        lines.append(f"  {label:<18} {v if v is not None else '-'}")
    for name, c in info["channels"].items():
        role = {"transmitted": "label-free", "marker": "death marker", "nuclear": "nuclear stain"}.get(c.get("role") or "", c.get("role") or "role unknown")
        lines.append(f"  {'channel':<18} {name}: {'x'.join(map(str, c['shape']))} {c['dtype']} ({role})")
    lines.append(f"  {'pixel size':<18} {info['pixel_size_um']:.4f} um/px (from {info['pixel_size_source']})")
    shown = {"plate"}
    for k, v in info["metadata"].items():
        if k not in shown:
            lines.append(f"  {k:<18} {v}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    from monitor.errors import BadInput, NotReady

    readers = readers_from_config(args.config)
    failures: list[int] = []
    for f in args.files:
        if not f.is_file():
            one_line_error(f, "no such file" if not f.exists() else "not a regular file")
            failures.append(EX_NOINPUT)
            continue
        try:
            r = readers.choose(f)
            info = describe(r.read(f), r.name)
        except NotReady as e:
            one_line_error(f, str(e))
            failures.append(EX_TEMPFAIL)
            continue
        except BadInput as e:
            one_line_error(f, str(e))
            failures.append(EX_DATAERR)
            continue
        except Exception as e:  # a reader plugin bug: one line, traceback only with -v
            log.debug("reader failed on %s", f, exc_info=True)
            one_line_error(f, f"reader failed: {type(e).__name__}: {e}")
            failures.append(EX_DATAERR)
            continue
        if args.json:
            print(json.dumps(info))
        else:
            print("\n".join(format_description(info)))
    if not failures:
        return 0
    if EX_NOINPUT in failures:
        return EX_NOINPUT
    return EX_TEMPFAIL if all(s == EX_TEMPFAIL for s in failures) else EX_DATAERR
