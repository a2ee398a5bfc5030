"""The straight line a frame takes. The daemon, replay, demo, benches and tests call it.

``process_frame`` does no I/O besides what the frame already holds; sinks run
after it returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from monitor.config import Config, ControlConfig, PipelineConfig
from monitor.control import otsu_control
from monitor.errors import StageError
from monitor.imaging import crop_cells, rescale
from monitor.protocols import Classifier, Encoder, Segmenter
from monitor.records import ControlSignal, Counts, Embeddings, Frame, States

_P, _C = PipelineConfig(), ControlConfig()  # the defaults live in the config models, nowhere else


@dataclass
class Pipeline:
    """Everything ``process_frame`` needs, built once at start-up (units in the names)."""

    segmenter: Segmenter
    encoders: Sequence[Encoder]
    classifier: Classifier
    pixel_size_um: float = _P.pixel_size_um
    crop_px: int = _P.crop_px
    blank_background: bool = _P.blank_background
    batch_size: int = _P.batch_size
    control_enabled: bool = _C.enabled
    control_min_region_px: int = _C.min_region_px
    control_min_snr: float = _C.min_snr

    @classmethod
    def from_config(cls, cfg: Config, segmenter: Segmenter, encoders: Sequence[Encoder], classifier: Classifier) -> Pipeline:
        """The pipeline a config describes, around already-built plugins."""
        p, c = cfg.pipeline, cfg.control
        return cls(segmenter, encoders, classifier, p.pixel_size_um, p.crop_px, p.blank_background, p.batch_size,
                   c.enabled, c.min_region_px, c.min_snr)


def embed(crops: np.ndarray, encoders: Sequence[Encoder], batch_size: int = 64) -> Embeddings:
    """Concatenate each encoder's vectors in the configured order, in batches."""
    parts = []
    for enc in encoders:
        if len(crops) == 0:
            parts.append(np.zeros((0, enc.dim), dtype=np.float32))
            continue
        chunks = [np.asarray(enc.encode(crops[s : s + batch_size]), dtype=np.float32) for s in range(0, len(crops), batch_size)]
        v = np.concatenate(chunks, axis=0)
        if v.shape != (len(crops), enc.dim):
            raise RuntimeError(f"encoder {enc.name} returned shape {v.shape}, expected ({len(crops)}, {enc.dim})")
        parts.append(v)
    vectors = np.concatenate(parts, axis=1) if parts else np.zeros((len(crops), 0), np.float32)
    return Embeddings(vectors, tuple(e.id for e in encoders), tuple(e.dim for e in encoders))


def count_states(frame: Frame, states: States, control: ControlSignal | None, stage_seconds: dict[str, float]) -> Counts:
    """Per-class counts (every reference class present, zeros included)."""
    n = len(states)
    per_class = np.bincount(states.predicted, minlength=len(states.classes)) if n else np.zeros(len(states.classes), int)
    return Counts(
        key=frame.key,
        instrument=frame.instrument,
        acquired_at=frame.acquired_at,
        pixel_size_um=frame.pixel_size_um,
        pixel_size_source=frame.pixel_size_source,
        n_cells=n,
        counts={c: int(k) for c, k in zip(states.classes, per_class, strict=True)},
        n_uncertain=int(states.uncertain.sum()) if n else 0,
        mean_certainty=float(states.certainty.mean()) if n else float("nan"),
        control=control,
        sources=frame.sources,
        missing_channels=frame.missing_channels,
        stage_seconds=stage_seconds,
    )


@contextmanager
def _stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    except Exception as e:  # the service counts failures by stage
        raise StageError(name, e) from e
    finally:
        seconds[name] = time.perf_counter() - t


def process_frame(frame: Frame, p: Pipeline) -> Counts:
    """Frame -> rescale -> segment -> crop -> embed -> EWC -> control -> Counts.

    Raises
    ------
    StageError
        Any failure inside a stage, naming the stage; the service quarantines
        the frame and carries on. Nothing here is fatal to the service.
    """
    s: dict[str, float] = {}
    with _stage("rescale", s):
        frame = rescale(frame, p.pixel_size_um)
    with _stage("segment", s):
        cells = p.segmenter.segment(frame)
    with _stage("crop", s):
        crops = crop_cells(frame, cells, p.crop_px, p.blank_background)
    with _stage("embed", s):
        emb = embed(crops, p.encoders, p.batch_size)
    with _stage("classify", s):
        states = p.classifier.classify(emb)
    with _stage("control", s):
        control = None
        if p.control_enabled and frame.control is not None:
            control = otsu_control(frame.channels[frame.control], frame.pixel_size_um, frame.control, p.control_min_region_px, p.control_min_snr)
    return count_states(frame, states, control, s)
