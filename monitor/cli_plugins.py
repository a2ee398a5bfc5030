"""``cellmonitor plugins list`` (and ``plugins check`` registered by cli_readers)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list installed plugins, check which reader takes a file")
    psub = p.add_subparsers(dest="plugins_command", metavar="ACTION")
    lp = psub.add_parser("list", help="every reader, segmenter, encoder and sink with its origin")
    lp.add_argument("--config", help="also search this config's plugin folders")
    lp.set_defaults(func=_list)
    p.set_defaults(func=_list, config=None)
    # the 'check' action lives with the readers
    from monitor import cli_readers

    cli_readers.register_check(psub)


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
