"""Reader choice: explicit in the config, or the most specific reader that accepts a file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from monitor.config import Config, PluginRef
from monitor.errors import BadInput
from monitor.protocols import BuildContext, FrameReader
from monitor.records import Acquisition
from monitor.registry import Registry


@dataclass
class ReaderSet:
    """The built readers, most specific first; ``fixed`` when the config names one."""

    readers: Sequence[FrameReader]
    fixed: bool = False

    def explain(self, path: Path) -> list[tuple[str, str | None]]:
        """(reader name, None if it accepts else its reason) for every reader."""
        return [(r.name, r.accepts(path)) for r in self.readers]

    def choose(self, path: Path) -> FrameReader:
        reasons = []
        for r in self.readers:
            why = r.accepts(path)
            if why is None:
                return r
            reasons.append(f"{r.name}: {why}")
        raise BadInput(path, "no reader accepts this file (" + "; ".join(reasons) + ")")

    def read(self, path: Path) -> Acquisition:
        return self.choose(path).read(path)


def build_readers(cfg: Config, registry: Registry, ctx: BuildContext) -> ReaderSet:
    """Build the configured reader, or every installed reader (options from ``[readers.<name>]``).

    In ``auto`` mode a reader that fails to build is skipped only if the
    config does not give it options; a configured one failing is fatal.
    """
    src = str(cfg.source or "<config>")
    if cfg.reader.name != "auto":
        opts = {**cfg.readers.get(cfg.reader.name, {}), **cfg.reader.options}
        r = registry.build("readers", PluginRef(name=cfg.reader.name, options=opts), ctx, src, "reader")
        return ReaderSet([r], fixed=True)
    readers = []
    for name in registry.names("readers") + [n for n in cfg.readers if ":" in n]:
        ref = PluginRef(name=name, options=cfg.readers.get(name, {}))
        try:
            readers.append(registry.build("readers", ref, ctx, src, f"readers.{name}"))
        except Exception:
            if name in cfg.readers:
                raise
    readers.sort(key=lambda r: -int(getattr(r, "specificity", 0)))
    return ReaderSet(readers)
