"""``cellmonitor plugins list`` and ``cellmonitor plugins check FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path

from monitor.cli.common import EX_DATAERR, EX_NOINPUT, one_line_error, readers_from_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list installed plugins, check which reader takes a file")
    psub = p.add_subparsers(dest="plugins_command", metavar="ACTION")
    lp = psub.add_parser("list", help="every reader, segmenter, encoder and sink with its origin")
    lp.add_argument("--config", metavar="CONFIG", help="also search this config's plugin folders")
    lp.set_defaults(func=_list)
    p.set_defaults(func=_list, config=None)
    _register_check(psub)


def _list(args: argparse.Namespace) -> int:
    from monitor.config import load_config
    from monitor.registry import Registry

    paths = load_config(args.config).plugins.paths if args.config else []
    reg = Registry(paths)
    rows = reg.list_plugins()
    width = max((len(r.name) for r in rows), default=4)
    for kind in ("readers", "segmenters", "encoders", "sinks"):
        print(f"{kind}:")
        for r in (x for x in rows if x.kind == kind):
            status = f"BROKEN: {r.error}" if r.error else r.description
            print(f"  {r.name:<{width}}  {status}\n  {'':<{width}}  from {r.origin}")
    return 0


def _register_check(psub: argparse._SubParsersAction) -> None:
    p = psub.add_parser("check", help="which reader takes a file, and why the others declined")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--config", type=Path, metavar="CONFIG", help="config with reader options and the reader choice")
    p.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    readers = readers_from_config(args.config)
    status = 0
    mode = "configured reader" if readers.fixed else "automatic choice, most specific first"
    for f in args.files:
        if not f.is_file():  # a reader judging a missing file by its name would mislead
            one_line_error(f, "no such file" if not f.exists() else "not a regular file")
            status = status or EX_NOINPUT
            continue
        print(f)
        print(f"  ({mode})")
        taken = None
        for r, why in readers.explain(f):
            spec = r.specificity
            if why is None and taken is None:
                taken = r.name
                print(f"  {r.name:<10} [{spec:>2}] TAKES this file")
            elif why is None:
                print(f"  {r.name:<10} [{spec:>2}] would accept, but {taken} is more specific")
            else:
                print(f"  {r.name:<10} [{spec:>2}] declined: {why}")
        if taken is None:
            one_line_error(f, "no reader accepts this file")
            status = status or EX_DATAERR
    return status
