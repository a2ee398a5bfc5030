"""The ``cellmonitor`` command: one module per command group, each with ``register(subparsers)``."""

from monitor.cli.main import main

__all__ = ["main"]
