"""The ``cellmonitor`` command.

Heavy imports happen after argument parsing so ``cellmonitor --help`` is
instant. Each feature area registers its subcommands from a small module
(``monitor.cli.*``) with ``register(subparsers)``; a handler returns an exit
status. A :class:`~monitor.errors.CellmonitorError` becomes one line on
stderr and its exit status (78 for configuration errors), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from monitor.errors import EX_IOERR, EX_SOFTWARE, CellmonitorError

log = logging.getLogger("monitor")

#: modules that add subcommands; each has register(subparsers)
COMMAND_MODULES = (
    "monitor.cli.service",
    "monitor.cli.plugins",
    "monitor.cli.inspect",
    "monitor.cli.segment",
    "monitor.cli.index",
    "monitor.cli.demo",
    "monitor.cli.models",
    "monitor.cli.report",
)


def setup_logging(level: str = "INFO") -> None:
    """Configure logging once, on stderr (journald keeps it under systemd)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command group's subcommands (no heavy imports)."""
    from monitor import __version__

    ap = argparse.ArgumentParser(
        prog="cellmonitor",
        description="Live-cell microscope monitoring: segment, embed and classify cell states as frames arrive.",
    )
    ap.add_argument("--version", action="version", version=f"cellmonitor {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # feature area not installed in this build
            raise
        mod.register(sub)
    _everywhere(sub)
    return ap


def _everywhere(sub: argparse._SubParsersAction) -> None:
    """``-v``/``-q`` after any subcommand too (``cellmonitor run CONFIG -v``), as before it.

    SUPPRESS as the default leaves the top-level value alone when the
    subcommand's own flag is not given.
    """
    for parser in dict.fromkeys(sub.choices.values()):
        opts = {o for a in parser._actions for o in a.option_strings}
        if "-v" not in opts and "--verbose" not in opts:
            parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        if "-q" not in opts and "--quiet" not in opts:
            parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                _everywhere(a)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status.

    A :class:`~monitor.errors.CellmonitorError` is one ``cellmonitor: error:``
    line and its own status (78 configuration, 65 bad input, 69 unavailable,
    74 I/O); any other exception is one ``internal error`` line and 70.
    """
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    setup_logging("DEBUG" if args.verbose else "WARNING" if args.quiet else "INFO")
    try:
        return int(args.func(args) or 0)
    except CellmonitorError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"cellmonitor: error: {line}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file the user named could not be written or read
        log.debug("I/O error", exc_info=True)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"cellmonitor: error: {where}{e.strerror or e}", file=sys.stderr)
        return EX_IOERR
    except Exception as e:  # last resort: one line, traceback only with -v
        log.debug("unexpected error", exc_info=True)
        print(f"cellmonitor: internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return EX_SOFTWARE



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
