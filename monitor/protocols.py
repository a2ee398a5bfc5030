"""The four plugin contracts, every member declared. Plugins need not subclass anything.

A plugin *spec* (what an entry point or a ``"module:attr"`` name points at)
is any object with ``name``, ``description``, ``Options`` (a pydantic model)
and ``build(options, ctx)``. Importing a spec must be cheap: heavy imports
(torch, transformers, faiss) happen inside ``build``.

Required and optional members
-----------------------------
Each Protocol (:class:`FrameReader`, :class:`Segmenter`, :class:`Encoder`,
:class:`Sink`) declares every member a built plugin has. The optional ones
carry their default on the matching base class (:class:`ReaderBase`,
:class:`SegmenterBase`, :class:`EncoderBase`, :class:`SinkBase`), as ray's
``Datasink`` declares its optional capabilities, and :data:`REQUIRED` names
the members a plugin must write itself. A plugin may subclass the base (the
built-ins do); one that does not is wrapped once, when it is built, by
:func:`complete`, which gives it the defaults for the optional members it
lacks. The core then reads every member directly: no ``getattr`` probe
anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from monitor.device import resolve_device
from monitor.records import Acquisition, Cells, Counts, Embeddings, Frame, States

if TYPE_CHECKING:
    from monitor.config import Config


@runtime_checkable
class FrameReader(Protocol):
    """Turns one file into an :class:`Acquisition`.

    ``accepts`` is cheap (name and at most the first bytes) and returns
    ``None`` when it takes the file or a short reason why not. ``read`` raises
    :class:`monitor.errors.NotReady` for a file still being written and
    :class:`monitor.errors.BadInput` for one that never will be readable.
    """

    name: str
    specificity: int  # optional (ReaderBase: 0)

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
    # optional, defaults in EncoderBase
    prefetches: bool
    version: str | None
    needs_fit: bool
    frame_only: bool

    def fit(self, crops: np.ndarray, labels: np.ndarray, classes: Sequence[str], settings: Any, folder: Path,
            progress: bool = True) -> dict[str, Any]:
        """Learn from labelled crops (``index build --from-marker``; optional: not fittable)."""
        ...

    def encode(self, crops: np.ndarray) -> np.ndarray:
        """float32 (N, dim) vectors of uint8 (N, S, S, 3) crops; deterministic, row-independent."""
        ...

    @property
    def cache_id(self) -> str:
        """The embedding cache's key for this encoder (optional: ``id``)."""
        ...

    @property
    def runtime(self) -> str:
        """What runs the model (optional: ``"torch"``), e.g. ``onnxruntime 1.32.0 (2 threads)``."""
        ...

    @property
    def reference_encoder(self) -> Encoder:
        """The encoder reference cells are embedded with (optional: itself)."""
        ...

    def prepare(self, crops: np.ndarray) -> Any:
        """The host half of ``encode`` (optional: the crops unchanged)."""
        ...

    def encode_prepared(self, x: Any) -> np.ndarray:
        """The model half of ``encode`` (optional: ``encode``)."""
        ...

    def to_device(self, device: str) -> bool:
        """Move the model to ``device``; False when it cannot (optional: False)."""
        ...


@runtime_checkable
class Classifier(Protocol):
    """Cell states from embeddings (the built-in one is EWC-FAISS, :class:`monitor.index.ewc.EWCClassifier`).

    ``index`` is the reference index the classifier searches (expert
    corrections are added to it), or None for one without an index.
    """

    index: Any

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
    # optional, defaults in SinkBase
    record_of_truth: bool
    wants_calls: bool
    path: Path | None

    def write(self, counts: Counts) -> None:
        """Keep one frame's counts; a record-of-truth sink writes a frame at most once."""
        ...

    def close(self) -> None:
        """Flush and release; called once at shutdown (optional: nothing to do)."""
        ...


# ---- optional members, with their defaults --------------------------------------------------


class ReaderBase:
    """Optional members of a :class:`FrameReader`.

    ``specificity``: in automatic reader choice the most specific reader that
    accepts a file reads it (a vendor reader before the generic TIFF one).
    """

    specificity: int = 0


class SegmenterBase:
    """Optional members of a :class:`Segmenter` (none yet; here so that one can be added with its default)."""


class EncoderBase:
    """Optional members of an :class:`Encoder`, with their defaults.

    * ``cache_id``: the key of the embedding cache (default: ``id``); a
      query-side wrapper (test-time augmentation) gives its own.
    * ``version``: the weights' version recorded in an index (default: none).
    * ``prefetches``: ``prepare`` is worth running in a thread, one chunk
      ahead of ``encode_prepared`` (decoding and normalising on the CPU while
      the GPU runs the previous chunk). Default False: ``encode`` is called.
    * ``prepare(crops)`` / ``encode_prepared(x)``: the two halves of
      ``encode`` when ``prefetches``.
    * ``to_device(device)``: move the model (the out-of-memory policy's last
      step moves a GPU encoder to the CPU); returns False when it cannot.
    * ``reference_encoder``: the encoder reference cells are embedded with
      (a query-side wrapper returns the encoder it wraps; default: itself).
    * ``runtime``: what runs the model, as shown by ``cellmonitor models`` and the
      run's first log lines (default ``"torch"``; an encoder on a CPU inference
      runtime names it, its version and its threads).
    """

    prefetches: bool = False
    version: str | None = None
    #: the encoder learns from the lab's references at ``index build --from-marker`` (:meth:`fit`)
    #: and is not ready to embed before
    needs_fit: bool = False
    #: the encoder measures each cell in its frame, under its mask (a :class:`FrameEncoder` whose
    #: ``encode(crops)`` serves only the warm-up): folders of crops cannot be its references
    frame_only: bool = False

    def fit(self, crops: np.ndarray, labels: np.ndarray, classes: Sequence[str], settings: Any, folder: Path,
            progress: bool = True) -> dict[str, Any]:
        """Learn from labelled crops, keep the weights under ``folder``; returns what was done."""
        raise NotImplementedError(f"{type(self).__name__} cannot be fitted")

    @property
    def cache_id(self) -> str:
        return str(self.id)  # type: ignore[attr-defined]

    @property
    def runtime(self) -> str:
        return "torch"

    @property
    def reference_encoder(self) -> Encoder:
        return self  # type: ignore[return-value]

    def prepare(self, crops: np.ndarray) -> Any:
        return crops

    def encode_prepared(self, x: Any) -> np.ndarray:
        return self.encode(x)  # type: ignore[attr-defined,no-any-return]

    def to_device(self, device: str) -> bool:
        return False


class SinkBase:
    """Optional members of a :class:`Sink`, with their defaults.

    * ``record_of_truth``: the service marks a frame done only after this
      sink wrote it (the CSV sink); default False (a live view).
    * ``wants_calls``: the counts carry every cell's call and the segmented
      image (``Counts.calls``), e.g. for overlays; default False.
    * ``path``: the file the sink writes, when it is one; the service
      restores its gauges from a record-of-truth sink's file at start-up.
    """

    record_of_truth: bool = False
    wants_calls: bool = False
    path: Path | None = None

    def close(self) -> None:
        return None


@runtime_checkable
class FrameEncoder(Encoder, Protocol):
    """An encoder that embeds cells in their frame's context (SAM's fast mode).

    ``encode_cells(frame, cells)`` returns (len(cells), dim) float32 in
    ``cells`` order; ``encode(crops)`` still works for crops without a frame
    (reference sets of single-cell images).
    """

    def encode_cells(self, frame: Frame, cells: Cells) -> np.ndarray: ...


#: the members a plugin must define itself; every other member has a default on its base class
REQUIRED: dict[str, tuple[str, ...]] = {
    "readers": ("name", "accepts", "read"),
    "segmenters": ("segment",),
    "encoders": ("name", "id", "dim", "encode"),
    "sinks": ("name", "write"),
}

_BASES: dict[str, type] = {"readers": ReaderBase, "segmenters": SegmenterBase, "encoders": EncoderBase, "sinks": SinkBase}


def complete(kind: str, plugin: Any) -> Any:
    """``plugin`` with every member of its kind's Protocol: itself when it subclasses the
    kind's base class, else a thin wrapper that forwards to it and supplies the defaults.

    The one place that asks a plugin which optional members it has; it runs
    once, when the plugin is built (:meth:`monitor.registry.Registry.build`).

    Raises
    ------
    TypeError
        A required member (:data:`REQUIRED`) is missing.
    """
    base = _BASES.get(kind)
    if base is None or isinstance(plugin, base):
        return plugin
    missing = [n for n in REQUIRED[kind] if not hasattr(plugin, n)]
    if missing:
        raise TypeError(f"{type(plugin).__name__} lacks {', '.join(missing)} (a {kind[:-1]} plugin needs {', '.join(REQUIRED[kind])})")
    own = {n for n in dir(plugin) if not n.startswith("_")}
    forward = (own & {n for n in dir(base) if not n.startswith("_")}) | {"encode_cells"} & own

    def _get(self: Any, n: str) -> Any:
        return getattr(self._inner, n)

    ns: dict[str, Any] = {"__doc__": f"{type(plugin).__name__}, with the defaults of {base.__name__}",
                          "__init__": _init, "__getattr__": _get, "__repr__": _repr}
    for n in forward:
        ns[n] = _forwarding(n)
    return type(f"{type(plugin).__name__}Completed", (base,), ns)(plugin)


def _init(self: Any, inner: Any) -> None:
    object.__setattr__(self, "_inner", inner)


def _forwarding(name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self._inner, name)

    return property(get)


def _repr(self: Any) -> str:
    return repr(self._inner)


# ---- what a factory is given ---------------------------------------------------------------


class ModelCache:
    """Models loaded once per process and shared between plugins, by an explicit key.

    SAM's segmenter and its fast encoder share one image encoder and its
    per-frame embeddings: the segmenter puts them here under
    ``("sam.frame_embeddings", model_type, checkpoint)``; the encoder built
    after it takes them. Nothing else passes between plugins.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[str, ...], Any] = {}

    def get(self, key: tuple[str, ...]) -> Any | None:
        """What was put under ``key``, or None."""
        return self._items.get(key)

    def put(self, key: tuple[str, ...], value: Any) -> None:
        """Share ``value`` under ``key`` with plugins built later."""
        self._items[key] = value


@dataclass
class BuildContext:
    """What the service hands a plugin factory: no globals. Build it with :func:`context_from`.

    ``experiment`` names frames whose files do not (readers); ``roles`` maps
    each reference class to its canonical state (sinks' columns, known once
    the index is loaded); ``models`` is the process's shared-model cache.
    """

    state_dir: Path
    config_path: Path | None = None
    metrics: Any = None  # monitor.service.metrics.ServiceMetrics or None
    device: str = "cpu"
    experiment: str = "default"
    roles: Mapping[str, str] | None = None
    models: ModelCache = field(default_factory=ModelCache)
    #: the reference index folder (an encoder fitted by ``index build`` keeps its weights there)
    index_dir: Path | None = None
    #: True while ``index build --from-marker`` builds the plugins: an encoder to be fitted is
    #: built from its base weights (its fitted weights do not exist yet) and fitted there
    fitting: bool = False
    #: the ``[tracking]`` table (monitor.config.TrackingConfig): the per-cell sink links cells by it
    tracking: Any = None


def context_from(cfg: Config, *, device: str | None = None, metrics: Any = None,
                 roles: Mapping[str, str] | None = None, index_dir: Path | None = None, fitting: bool = False) -> BuildContext:
    """The build context a configuration implies: its state folder, its own path (plugin
    paths are relative to it), its experiment, and ``device`` (default: the configured
    ``pipeline.device``, resolved to one this machine has)."""
    s = cfg.service
    return BuildContext(state_dir=s.state_dir, config_path=cfg.path, metrics=metrics,
                        device=device if device is not None else resolve_device(cfg.pipeline.device),
                        experiment=s.experiment, roles=roles, index_dir=index_dir or cfg.classifier.index, fitting=fitting,
                        tracking=cfg.tracking)


class PluginSpec(Protocol):
    """What an entry point names: see :func:`monitor.registry.plugin_spec`."""

    name: str
    description: str
    Options: type[BaseModel]

    def build(self, options: Any, ctx: BuildContext) -> Any:
        """The plugin, from validated ``options``; failures are fatal start-up errors."""
        ...
