"""Query-side options of an index, applied by whoever embeds and classifies query cells.

Design. An index is built from reference crops embedded by the configured
encoders, unchanged. Options that only concern queries are recorded in the
index (``meta.json`` ``query``) rather than in the encoder, so one set of
reference embeddings (and one embedding cache) serves both, and the service,
``classify`` and ``evaluate`` cannot disagree with the index about them:
each calls :func:`query_encoders` on the encoders it built (after the index
has checked their ids) and embeds its query crops with the result.

* ``tta: 8`` -- test-time augmentation: each query crop is embedded in its 8
  orientations (the dihedral group: 4 rotations x mirror; cells have no
  orientation) and the 8 vectors are averaged. The reference side is not
  augmented. :class:`TTAEncoder` wraps any encoder (same ``name``, ``id``
  and ``dim``, so the index's encoder check is unchanged); it costs 8x the
  encoder time per query cell.

Crop framing is the other half of "queries look like references": an index
built from boxed frames with box framing (the default) asks the service to
frame segmented cells by their bounding box the same way
(:func:`crop_framing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from monitor.imaging import BOX_MARGIN, crop_cells, rescale
from monitor.protocols import EncoderBase
from monitor.records import Cells, Frame, FrameKey


def dihedral8(crops: np.ndarray) -> np.ndarray:
    """(8 N, H, W, C): every crop in its 8 orientations, orientation-major
    (rows ``j * N + i`` hold orientation ``j`` of crop ``i``). Square crops only."""
    x = np.asarray(crops)
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
        raise ValueError(f"test-time augmentation needs square (N, H, H, C) crops (got {x.shape})")
    views = []
    for flip in (False, True):
        base = x[:, :, ::-1] if flip else x
        for r in range(4):
            views.append(np.rot90(base, r, axes=(1, 2)))
    return np.ascontiguousarray(np.concatenate(views, axis=0))


class TTAEncoder(EncoderBase):
    """Any encoder, embedding each crop as the mean of its 8 orientations (query side only).

    ``name``, ``id`` and ``dim`` are the wrapped encoder's: the index checks
    the encoder it was built with; the augmentation is the index's query
    option, not a different encoder.
    """

    def __init__(self, encoder: Any, batch_size: int = 64):
        self.encoder = encoder
        self.name = encoder.name
        self.id = encoder.id
        self.dim = encoder.dim
        self.batch_size = batch_size

    @property
    def cache_id(self) -> str:
        return f"{self.encoder.cache_id}+tta8"  # the embedding cache tells them apart

    @property
    def reference_encoder(self) -> Any:
        return self.encoder  # reference cells are embedded without the augmentation

    def encode(self, crops: Any) -> np.ndarray:
        """Mean of the encoder's vectors over the 8 flips/rotations of each crop."""
        x = np.asarray(crops)
        n = len(x)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        views = dihedral8(x)
        b = max(1, self.batch_size)
        v = np.concatenate([np.asarray(self.encoder.encode(views[s : s + b]), dtype=np.float32) for s in range(0, len(views), b)])
        return v.reshape(8, n, -1).mean(axis=0)


def query_encoders(encoders: Sequence[Any], meta: Any) -> list[Any]:
    """The encoders to embed query cells with, under the index's query options (``meta``: an :class:`~monitor.index.store.IndexMeta`)."""
    if meta.tta == 8:
        return [TTAEncoder(e) for e in encoders]
    return list(encoders)


def crop_framing(meta: Any) -> tuple[str, float] | None:
    """``("box", margin)`` when the index's references were boxed cells framed by their box, else None
    (the pipeline keeps its configured framing)."""
    prep = meta.preprocessing or {}
    if prep.get("layout") == "voc" and prep.get("box_framing", "window") == "box":
        return "box", float(prep.get("box_margin", BOX_MARGIN))
    return None


def query_pipeline(pipeline: Any, index: Any) -> Any:
    """``pipeline`` with the index's query side applied: query encoders (TTA) and crop framing.

    Used by the service when it builds its pipeline around a loaded index, by
    the benchmarks and by the tests, so they all classify the same way.
    """
    framing = crop_framing(index.meta)
    changes: dict[str, Any] = {"encoders": query_encoders(pipeline.encoders, index.meta)}
    if framing is not None and hasattr(pipeline, "crop_framing"):
        changes["crop_framing"], changes["crop_margin"] = framing
    return replace(pipeline, **changes)


def segment_query(image: np.ndarray, prep: Any, segmenter: Any, blank_background: bool,
                  framing: tuple[str, float]) -> tuple[Frame, Cells, np.ndarray] | None:
    """(frame at the index's pixel size, its cells, their crops) of a query image, or None when it is too small to segment.

    The image is taken at the index's data pixel size (``prep``: the index's
    :class:`~monitor.index.dataset.Preprocess`), rescaled to the target,
    segmented, and each cell cropped as the service crops (the index's crop
    framing, the config's background blanking).
    """
    if min(image.shape[:2]) < 16:
        return None
    src = prep.source_pixel_size_um or prep.pixel_size_um
    frame = rescale(Frame(FrameKey("classify", "-", "-", 0), {"image": image}, "image", None, src, "config", "classify"), prep.pixel_size_um)
    cells = segmenter.segment(frame)
    return frame, cells, crop_cells(frame, cells, prep.crop_px, blank_background, framing[0], framing[1])
