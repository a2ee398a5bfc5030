"""The nouns of the pipe: what crosses each stage boundary.

A file becomes an :class:`Acquisition` (one reader call), acquisitions of the
same experiment/well/field/timepoint are grouped into a :class:`Frame`, and a
frame flows ``Frame -> Cells -> Crops -> Embeddings -> States -> Counts``.
Every record is frozen; units are in the field names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np

#: Where a pixel size came from: ``"metadata:<kind>"`` or ``"config"``.
PixelSizeSource = str
#: what a channel holds, as its reader declares it
#: what a channel is: the label-free image cells are segmented and embedded from (``transmitted``:
#: bright field, phase, refractive index), a death marker (``marker``: PI, Apo-15, SYTOX, annexin),
#: a nuclear stain (``nuclear``: Hoechst, DAPI), another fluorescence channel, or ``other``
ChannelRole = Literal["transmitted", "marker", "nuclear", "fluorescence", "other"]


def channel_key(name: str) -> str:
    """How channel names compare everywhere (config, assembler): case and surrounding or
    repeated spaces do not matter (``"Bright  Field"`` is ``"bright field"``)."""
    return " ".join(name.split()).casefold()


@dataclass(frozen=True)
class FrameKey:
    """Identity of one timepoint of one field: the unit that is counted."""

    experiment: str
    well: str
    field: str
    timepoint: int

    def __str__(self) -> str:
        return f"{self.experiment}/{self.well}/{self.field}/t{self.timepoint}"


@dataclass(frozen=True)
class Acquisition:
    """What a reader returns for one file: one or more channels of one frame.

    ``channels`` maps channel name to a 2-D array (Y, X) or an RGB array
    (Y, X, 3) in the file's own dtype and pixel grid. ``roles`` says, per
    channel, what the reader knows it holds (``transmitted``: bright field,
    phase, refractive index, segmented and embedded; ``fluorescence``: a
    marker, the control signal); a channel absent from ``roles`` is unknown.
    """

    path: Path
    key: FrameKey
    channels: Mapping[str, np.ndarray]
    pixel_size_um: float
    pixel_size_source: PixelSizeSource
    instrument: str
    acquired_at: datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    roles: Mapping[str, ChannelRole] = field(default_factory=dict)


@dataclass(frozen=True)
class Frame:
    """All channels of one field at one timepoint, on one pixel grid.

    ``primary`` names the channel that is segmented and embedded
    (brightfield, phase or refractive index); ``control`` the fluorescence
    death-marker channel, or ``None``.
    """

    key: FrameKey
    channels: Mapping[str, np.ndarray]
    primary: str
    control: str | None
    pixel_size_um: float
    pixel_size_source: PixelSizeSource
    instrument: str
    acquired_at: datetime | None = None
    sources: tuple[Path, ...] = ()
    missing_channels: tuple[str, ...] = ()
    #: (height, width) on the instrument's own grid, before the rescale to the common pixel size
    #: (None: not rescaled); masks made by other tools are on that grid
    source_shape_yx: tuple[int, int] | None = None

    @property
    def image(self) -> np.ndarray:
        """The primary channel."""
        return self.channels[self.primary]

    @property
    def shape_px(self) -> tuple[int, int]:
        """(height, width) of the primary channel in pixels."""
        return tuple(self.image.shape[:2])  # type: ignore[return-value]


@dataclass(frozen=True)
class Cell:
    """One segmented cell on the frame's (rescaled) pixel grid."""

    id: int
    centroid_yx_px: tuple[float, float]
    area_um2: float
    bbox_px: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive)


@dataclass(frozen=True)
class Cells:
    """Instance segmentation of a frame: label image (0 = background) and cells."""

    labels: np.ndarray
    cells: tuple[Cell, ...]
    pixel_size_um: float

    def __len__(self) -> int:
        return len(self.cells)


@dataclass(frozen=True)
class Embeddings:
    """One row per crop: encoder vectors concatenated in ``encoder_ids`` order."""

    vectors: np.ndarray  # (N, D) float32
    encoder_ids: tuple[str, ...]
    dims: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


@dataclass(frozen=True)
class States:
    """EWC-FAISS result, one entry per cell (see :mod:`monitor.classify`).

    ``neighbor_ids``/``neighbor_labels``/``neighbor_distances`` are padded
    with -1 / -1 / inf beyond ``k_used`` of each row.
    """

    classes: tuple[str, ...]
    predicted: np.ndarray  # (N,) int class index
    certainty: np.ndarray  # (N,) float, 1 - normalised entropy
    k_used: np.ndarray  # (N,) int
    uncertain: np.ndarray  # (N,) bool, certainty below the configured floor
    neighbor_ids: np.ndarray  # (N, K) int64
    neighbor_labels: np.ndarray  # (N, K) int
    neighbor_distances: np.ndarray  # (N, K) float32
    #: (N,) bool: farther from its nearest references than the references are from
    #: each other (monitor.index.unknown; a kind the references do not cover); None: not checked
    unknown: np.ndarray | None = None
    #: version of the reference index that classified these cells (grows with expert corrections)
    index_version: int = 0

    def __len__(self) -> int:
        return int(self.predicted.shape[0])

    def label(self, i: int) -> str:
        """The class name predicted for cell ``i``."""
        return self.classes[int(self.predicted[i])]


@dataclass(frozen=True)
class ControlSignal:
    """Otsu control signal on the fluorescence channel (paper section 3.4)."""

    channel: str
    threshold: float
    area_um2: float
    area_fraction: float
    n_regions: int


@dataclass(frozen=True)
class CellCalls:
    """Each cell's call on the grid it was segmented on: what an overlay draws.

    Carried by :class:`Counts` only when a sink asks for it (``wants_calls``;
    the overlay sink), so the default service keeps no per-cell data.
    """

    image: np.ndarray  # the segmented (primary) channel, rescaled
    labels: np.ndarray  # instance labels on the same grid
    cell_ids: np.ndarray  # (N,) label of each classified cell
    predicted: np.ndarray  # (N,) class index
    uncertain: np.ndarray  # (N,) bool
    classes: tuple[str, ...]
    pixel_size_um: float
    certainty: np.ndarray | None = None  # (N,) 1 - normalised entropy of the neighbours' labels
    unknown: np.ndarray | None = None  # (N,) bool: farther from every reference than the calibrated distance
    centroid_yx_px: np.ndarray | None = None  # (N, 2) on this grid
    area_um2: np.ndarray | None = None  # (N,)
    #: the death marker's value per rule channel (background MADs) and its verdict per cell
    #: (a state, or "" when within the margin of a threshold), on frames that carry the marker
    marker_values: Mapping[str, np.ndarray] | None = None
    marker_labels: np.ndarray | None = None


@dataclass(frozen=True)
class MarkerAgreement:
    """Classifier against the death marker on one frame (see :mod:`monitor.marker`).

    ``n_labelled`` cells got a marker label (the rest were ambiguous: within
    the margin of a threshold); ``n_agree`` of them were called the same
    canonical state by the classifier.
    """

    n_labelled: int
    n_agree: int
    n_ambiguous: int

    @property
    def fraction(self) -> float:
        """Share of marker-labelled cells the classifier agrees with (nan when none)."""
        return self.n_agree / self.n_labelled if self.n_labelled else float("nan")


#: the frame's own tallies, written as ``n_<name>`` beside each class's ``n_<class>``
#: (:attr:`Counts.n_cells`, ``n_uncertain``, ``n_unknown``): no reference class may take these names
COUNT_TALLIES = ("cells", "uncertain", "unknown")


@dataclass(frozen=True)
class Counts:
    """Per-timepoint result: what the sinks record."""

    key: FrameKey
    instrument: str
    acquired_at: datetime | None
    pixel_size_um: float
    pixel_size_source: PixelSizeSource
    n_cells: int
    counts: Mapping[str, int]
    n_uncertain: int
    mean_certainty: float
    control: ControlSignal | None
    sources: tuple[Path, ...] = ()
    missing_channels: tuple[str, ...] = ()
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    #: cells flagged unknown (each is also counted under its predicted state)
    n_unknown: int = 0
    #: version of the reference index the frame was counted with
    index_version: int = 0
    #: classifier vs death marker on this frame, when it carries the marker channel
    marker: MarkerAgreement | None = None
    #: per-cell calls, kept only when a sink wants them (Pipeline.keep_calls)
    calls: CellCalls | None = field(default=None, repr=False, compare=False)

    def fraction(self, state: str) -> float:
        """Share of the frame's cells in ``state`` (0 for an empty frame or an unknown state)."""
        return self.counts.get(state, 0) / self.n_cells if self.n_cells else 0.0
