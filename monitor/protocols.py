"""The four plugin contracts. Plugins need not subclass anything.

A plugin *spec* (what an entry point or a ``"module:attr"`` name points at)
is any object with ``name``, ``description``, ``Options`` (a pydantic model)
and ``build(options, ctx)``. Importing a spec must be cheap: heavy imports
(torch, transformers, faiss) happen inside ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from monitor.records import Acquisition, Cells, Counts, Embeddings, Frame, States


@runtime_checkable
class FrameReader(Protocol):
    """Turns one file into an :class:`Acquisition`.

    ``accepts`` is cheap (name and at most the first bytes) and returns
    ``None`` when it takes the file or a short reason why not. ``read`` raises
    :class:`monitor.errors.NotReady` for a file still being written and
    :class:`monitor.errors.BadInput` for one that never will be readable.
    """

    name: str
    specificity: int

    def accepts(self, path: Path) -> str | None:
        """None to take ``path``, else a short reason; must not decode the file.

        An exception raised here counts as declining (the reason names it).
        """
        ...

    def read(self, path: Path) -> Acquisition:
        """Decode ``path`` fully, declaring each channel's role where known.

        Raises
        ------
        NotReady
            The file may still be being written (truncated, empty): retried
            with back-off until ``service.ready_deadline_s``.
        BadInput
            The file will never be readable: quarantined, one line.
        """
        ...


@runtime_checkable
class Segmenter(Protocol):
    """Instance segmentation of the frame's primary channel."""

    def segment(self, frame: Frame) -> Cells:
        """Cells of ``frame`` (already at the common pixel size); an empty field is 0 cells.

        Any exception quarantines the frame (stage ``segment``); it is never
        fatal to the service.
        """
        ...


@runtime_checkable
class Encoder(Protocol):
    """A frozen image encoder: uint8 RGB crops (N, S, S, 3) -> float32 (N, dim).

    ``id`` identifies weights and preprocessing; an index built with one id
    refuses an encoder with another.
    """

    name: str
    id: str
    dim: int

    def encode(self, crops: np.ndarray) -> np.ndarray:
        """float32 (N, dim) vectors of uint8 (N, S, S, 3) crops; deterministic, row-independent."""
        ...


@runtime_checkable
class Classifier(Protocol):
    """Cell states from embeddings (the built-in one is EWC-FAISS, monitor.index.store.EWCClassifier)."""

    @property
    def classes(self) -> tuple[str, ...]:
        """The reference classes, in label order."""
        ...

    def classify(self, emb: Embeddings) -> States:
        """One state per embedding row, with certainty and the neighbours that decided it."""
        ...


@runtime_checkable
class Sink(Protocol):
    """Receives per-timepoint counts after the pipeline returns.

    ``record_of_truth = True`` (the CSV sink): the service marks a frame done
    only after this sink wrote it; if its ``write`` fails, the frame is not
    marked done. Failures of other sinks (``record_of_truth = False``) are
    logged and counted only. ``name`` labels the sink in logs and metrics.
    """

    name: str
    record_of_truth: bool

    def write(self, counts: Counts) -> None:
        """Keep one frame's counts; a record-of-truth sink writes a frame at most once."""
        ...

    def close(self) -> None:
        """Flush and release; called once at shutdown."""
        ...


@dataclass
class BuildContext:
    """What the service hands a plugin factory: no globals."""

    state_dir: Path
    config_path: Path | None = None
    metrics: Any = None  # monitor.service.metrics.ServiceMetrics or None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


class PluginSpec(Protocol):
    """What an entry point names: see :func:`monitor.registry.plugin_spec`."""

    name: str
    description: str
    Options: type[BaseModel]

    def build(self, options: Any, ctx: BuildContext) -> Any:
        """The plugin, from validated ``options``; failures are fatal start-up errors."""
        ...
