"""Helpers every command group shares (no command group imports another)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from monitor.errors import EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL

__all__ = ["EX_DATAERR", "EX_NOINPUT", "EX_TEMPFAIL", "one_line_error", "readers_from_config"]


def readers_from_config(config: Path | None) -> Any:
    """The readers exactly as the service builds them, from ``config`` or the defaults."""
    from monitor.config import config_or_default
    from monitor.intake.readers import build_readers
    from monitor.protocols import context_from
    from monitor.registry import Registry

    cfg = config_or_default(config)
    reg = Registry(cfg.plugins.paths)
    ctx = context_from(cfg, device="cpu")
    return build_readers(cfg, reg, ctx)


def one_line_error(path: Path, problem: str) -> None:
    """Print ``cellmonitor: error: PATH: problem`` as one line on stderr."""
    line = " ".join(str(problem).split())  # one line whatever the reader put in it
    print(f"cellmonitor: error: {line}" if line.startswith(str(path)) else f"cellmonitor: error: {path}: {line}",
          file=sys.stderr, flush=True)
