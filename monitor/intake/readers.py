"""Reader choice: explicit in the config, or the most specific reader that accepts a file.

The service, ``inspect`` and ``plugins check`` all choose through
:class:`ReaderSet`, so what ``plugins check`` says is what the service does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from monitor.config import Config, PluginRef
from monitor.errors import BadInput, NotReady
from monitor.intake.events import FileEvent
from monitor.protocols import BuildContext, FrameReader
from monitor.records import Acquisition
from monitor.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class ReaderSet:
    """The built readers, most specific first; ``fixed`` when the config names one."""

    readers: Sequence[FrameReader]
    fixed: bool = False

    def explain(self, path: Path) -> list[tuple[FrameReader, str | None]]:
        """(reader, None if it accepts else its reason) for every reader, most specific first.

        A reader whose ``accepts`` raises is reported as declining with the error.
        """
        out: list[tuple[FrameReader, str | None]] = []
        for r in self.readers:
            try:
                why = r.accepts(path)
            except Exception as e:  # a plugin's accepts must not stop the explanation
                why = f"accepts() failed: {type(e).__name__}: {e}"
            out.append((r, why))
        return out

    def choose(self, path: Path) -> FrameReader:
        """The first (most specific) reader that accepts ``path``; the same verdicts as :meth:`explain`.

        Raises
        ------
        BadInput
            No reader accepts the file; the message lists each reader's reason.
            A reader whose ``accepts`` raises counts as declining, so
            ``plugins check`` and the service always agree.
        """
        reasons = []
        for r, why in self.explain(path):
            if why is None:
                return r
            reasons.append(f"{r.name}: {why}")
        raise BadInput(path, "no reader accepts this file (" + "; ".join(reasons) + ")")


def read_file(readers: ReaderSet, path: Path) -> Acquisition | FileEvent:
    """Choose a reader and decode ``path``; every failure sorted into one event.

    :class:`~monitor.errors.NotReady` is ``not_ready`` (retried by the
    caller, :func:`monitor.intake.files.retry_or_give_up`),
    :class:`~monitor.errors.BadInput` is ``bad`` with the reader's own line,
    and any other exception (a reader plugin's bug) is ``bad`` naming its
    type: it costs this file only, never the loop.
    """
    try:
        return readers.choose(path).read(path)
    except NotReady as e:
        return FileEvent("not_ready", (str(path),), e.problem)
    except BadInput as e:
        return FileEvent("bad", (str(path),), e.problem)
    except Exception as e:  # a reader plugin bug must not stop the service
        return FileEvent("bad", (str(path),), f"{type(e).__name__}: {e}")


def build_readers(cfg: Config, registry: Registry, ctx: BuildContext) -> ReaderSet:
    """Build the configured reader, or every installed reader (options from ``[readers.<name>]``).

    In ``auto`` mode a reader that fails to build is skipped only if the
    config does not give it options; a configured one failing is fatal.
    """
    src = cfg.source_name
    if cfg.reader.name != "auto":
        opts = {**cfg.readers.get(cfg.reader.name, {}), **cfg.reader.options}
        r = registry.build("readers", PluginRef(name=cfg.reader.name, options=opts), ctx, src, "reader")
        return ReaderSet([r], fixed=True)
    readers = []
    for name in registry.names("readers") + [n for n in cfg.readers if ":" in n]:
        ref = PluginRef(name=name, options=cfg.readers.get(name, {}))
        try:
            readers.append(registry.build("readers", ref, ctx, src, f"readers.{name}"))
        except Exception as e:
            if name in cfg.readers:
                raise
            log.warning("reader %s skipped in automatic choice: %s", name, e)
    readers.sort(key=lambda r: -int(r.specificity))
    return ReaderSet(readers)
