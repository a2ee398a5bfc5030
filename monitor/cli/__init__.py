"""The ``cellmonitor`` command: one module per command group, each with ``register(subparsers)``.

Imports: everywhere else in ``monitor`` project modules are imported at the
top of the module and only the heavy libraries (torch, faiss, ray, numba,
transformers) lazily. The command modules are the one exception, by design:
their project imports sit inside each command's function, after argument
parsing, so that ``cellmonitor --help`` and a mistyped flag answer at once
instead of loading scipy, pandas and matplotlib first (STYLE: heavy imports
after argument parsing).
"""

from monitor.cli.main import main

__all__ = ["main"]
