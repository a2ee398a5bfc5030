"""The cells behind a count: one frame through the pipeline's public pieces, keeping each cell's call.

:func:`monitor.pipeline.process_frame` returns counts only; the report and the
``overlay`` command need the per-cell states too. :func:`call_cells` runs the
same steps with the same :class:`~monitor.pipeline.Pipeline` (rescale ->
segment -> crop -> embed -> classify, the pipeline's crop size, background
blanking, crop framing and encoders), so a frame's per-cell states add up to
the counts the service recorded for it as long as the index is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import BadInput, NoInput
from monitor.imaging import crop_cells, rescale
from monitor.intake.assemble import merge
from monitor.pipeline import embed_cells
from monitor.records import Cells, Frame, States


@dataclass(frozen=True)
class FrameCalls:
    """A frame (at the pipeline's pixel size), its cells, their crops and their states."""

    frame: Frame
    cells: Cells
    crops: np.ndarray  # (N, crop_px, crop_px, 3) uint8, what the encoders saw
    states: States

    def counts(self) -> dict[str, int]:
        """Cells per class, every class present."""
        n = np.bincount(self.states.predicted, minlength=len(self.states.classes)) if len(self.states) else np.zeros(len(self.states.classes), int)
        return {c: int(k) for c, k in zip(self.states.classes, n, strict=True)}


def call_cells(frame: Frame, pipeline: Any) -> FrameCalls:
    """Segment, crop, embed and classify ``frame`` exactly as the service does (module docstring)."""

    p = pipeline
    frame = rescale(frame, p.pixel_size_um)
    cells = p.segmenter.segment(frame)
    crops = crop_cells(frame, cells, p.crop_px, p.blank_background, p.crop_framing, p.crop_margin, p.crop_contrast)
    emb = embed_cells(frame, cells, crops, p.encoders, p.batch_size, p.oom)  # configured order, as the index was built
    return FrameCalls(frame, cells, crops, p.classifier.classify(emb))


def read_frame(paths: Sequence[Path], cfg: Any, readers: Any) -> Frame:
    """One frame from its channel files, read and merged as the service does.

    ``readers`` is the :class:`~monitor.intake.readers.ReaderSet` built from
    ``cfg``; the configured primary and control channels are used when the
    files hold them, else the first channel is primary. Raises
    :class:`~monitor.errors.BadInput` naming the file when one cannot be read.
    """

    parts = []
    for path in paths:
        if not path.is_file():
            raise NoInput(path)
        acq = readers.choose(path).read(path)
        if not acq.channels:
            raise BadInput(path, "no image channel in the file")
        parts.append(acq)
    names = [n for a in parts for n in a.channels]
    a = cfg.assembly
    primary = a.primary if a.primary in names else names[0]
    control = a.control if a.control in names and a.control != primary else "none"
    frame = merge(parts, primary, control)
    img = frame.image
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 2:
        raise BadInput(paths[0], f"not a 2-D image (shape {img.shape})")
    return frame


def find_sources(names: Sequence[str], folder: Path, recursive: bool = True) -> list[Path] | None:
    """The files named in a counts row's ``sources``, in ``folder`` (or below it); None when any is gone."""
    out = []
    for name in names:
        p = folder / name
        if not p.is_file() and recursive:
            p = next(iter(sorted(folder.rglob(name))), p)
        if not p.is_file():
            return None
        out.append(p)
    return out
