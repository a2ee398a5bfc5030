"""Shared helpers of the EWC benchmarks (data locations, encoders, cached embedding)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CELLMONITOR_SHARED_DATA", REPO.parent / "shared" / "data"))
LITES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

_ENCODERS: dict[str, Any] = {}


def encoder(name: str) -> Any:
    """Build an encoder by plugin name once per process."""
    if name not in _ENCODERS:
        from monitor.config import PluginRef
        from monitor.protocols import BuildContext
        from monitor.registry import Registry

        _ENCODERS[name] = Registry().build("encoders", PluginRef(name=name), BuildContext(state_dir=Path("/tmp")))
    return _ENCODERS[name]


def embedded(data: Path, names: tuple[str, ...], prep: Any, classes: list[str] | None = None, progress: bool = True) -> Any:
    from monitor.cache import EmbeddingCache, embed_dataset
    from monitor.dataset import scan

    ds = scan(data, classes)
    return embed_dataset(ds, [encoder(n) for n in names], prep, EmbeddingCache(), batch_size=32, progress=progress)


def need_data() -> None:
    if not DATA.is_dir():
        print(f"real data not found at {DATA}; set CELLMONITOR_SHARED_DATA", file=sys.stderr)
        sys.exit(2)
