"""The straight line a frame takes. The daemon, replay, demo, benches and tests call it.

``process_frame`` does no I/O besides what the frame already holds; sinks run
after it returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from monitor.batching import OomPolicy, encode_all
from monitor.config import Config, ControlConfig, PipelineConfig
from monitor.control import otsu_control
from monitor.errors import StageError
from monitor.imaging import crop_cells, rescale
from monitor.marker import MarkerCheck
from monitor.protocols import Classifier, Encoder, FrameEncoder, Segmenter
from monitor.records import (
    CellCalls,
    Cells,
    ControlSignal,
    Counts,
    Embeddings,
    Frame,
    MarkerAgreement,
    States,
)

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
    crop_framing: str = "window"  # "box": each cell framed by its bounding box (set from the index, monitor.index.query)
    crop_margin: float = 0.2
    frames_per_call: int = _P.frames_per_call  # the most queued frames a caller hands process_frames at once
    prefetch: bool = True  # segment the next frames in a thread while this batch is embedded
    oom: OomPolicy = field(default_factory=OomPolicy, repr=False)  # batch sizes learnt from CUDA OOM
    marker: MarkerCheck | None = None  # classifier vs death marker on frames that carry it (monitor.marker)
    keep_calls: bool = False  # hand each cell's call to the sinks (Counts.calls: overlays)
    crop_contrast: str = _P.crop_contrast  # the grey levels crops are cut with (monitor.imaging.frame_view)

    @classmethod
    def from_config(cls, cfg: Config, segmenter: Segmenter, encoders: Sequence[Encoder], classifier: Classifier) -> Pipeline:
        """The pipeline a config describes, around already-built plugins."""
        p, c = cfg.pipeline, cfg.control
        return cls(segmenter, encoders, classifier, p.pixel_size_um, p.crop_px, p.blank_background, p.batch_size,
                   c.enabled, c.min_region_px, c.min_snr, frames_per_call=p.frames_per_call, crop_contrast=p.crop_contrast)


def embed(crops: np.ndarray, encoders: Sequence[Encoder], batch_size: int = 64, policy: OomPolicy | None = None) -> Embeddings:
    """Concatenate each encoder's vectors in the configured order, in batches.

    Chunking, prefetch and the GPU out-of-memory policy are
    :func:`monitor.batching.encode_all`'s. Crops alone carry no frame, so a
    frame-context encoder (:class:`FrameEncoder`) is called through its
    plain ``encode`` here.
    """
    vectors = _embed_crops(crops, encoders, batch_size, policy)
    return Embeddings(vectors, tuple(e.id for e in encoders), tuple(e.dim for e in encoders))


def _embed_crops(crops: np.ndarray, encoders: Sequence[Encoder], batch_size: int, policy: OomPolicy | None) -> np.ndarray:
    parts = [encode_all(enc, crops, batch_size, policy) for enc in encoders]
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(crops), 0), np.float32)


def count_states(frame: Frame, states: States, control: ControlSignal | None, stage_seconds: dict[str, float],
                 marker: MarkerAgreement | None = None, calls: CellCalls | None = None) -> Counts:
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
        n_unknown=int(states.unknown.sum()) if n and states.unknown is not None else 0,
        index_version=states.index_version,
        marker=marker,
        calls=calls,
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

    The one-frame case of :func:`process_frames` (same code, same numbers).

    Raises
    ------
    StageError
        Any failure inside a stage, naming the stage; the service quarantines
        the frame and carries on. Nothing here is fatal to the service.
    """
    result = process_frames([frame], p)[0]
    if isinstance(result, StageError):
        raise result
    return result


@dataclass
class _Segmented:
    frame: Frame  # rescaled
    cells: Cells
    crops: np.ndarray
    seconds: dict[str, float]


def _segment(frame: Frame, p: Pipeline) -> _Segmented:
    s: dict[str, float] = {}
    with _stage("rescale", s):
        frame = rescale(frame, p.pixel_size_um)
    with _stage("segment", s):
        cells = p.segmenter.segment(frame)
    with _stage("crop", s):
        crops = crop_cells(frame, cells, p.crop_px, p.blank_background, p.crop_framing, p.crop_margin, p.crop_contrast)
    return _Segmented(frame, cells, crops, s)


class SegmentAhead:
    """Frames segmented in one background thread ahead of the call that embeds them.

    A caller with a backlog (the service) hands the first frame of its *next* call here
    while the current call's crops are embedded, so the encoders do not wait for that
    frame's segmentation when the next call starts: the two stages (segment, embed) run
    side by side across calls as :func:`process_frames` runs them within one. Bounded:
    only the frames handed in are held, and each is taken once.
    """

    def __init__(self, p: Pipeline):
        self.p = p
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="segment-ahead")
        self.pending: dict[int, Future[_Segmented]] = {}

    def submit(self, frame: Frame) -> None:
        if id(frame) not in self.pending:
            self.pending[id(frame)] = self.pool.submit(_segment, frame, self.p)

    def take(self, frame: Frame) -> Future[_Segmented] | None:
        """The segmentation started for ``frame`` (None: not handed in)."""
        return self.pending.pop(id(frame), None)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def process_frames(frames: Sequence[Frame], p: Pipeline, ahead: SegmentAhead | None = None) -> list[Counts | StageError]:
    """Several frames at once, crops of all of them sharing encoder calls.

    Each frame's result is exactly what :func:`process_frame` gives it alone
    (an encoder's vector for a crop does not depend on the other crops in its
    batch; tested), in the order given; a frame whose stage fails gets its
    :class:`StageError` in its place and the others go on.

    Policy:

    - Latency is bounded by the caller: only frames already due are passed
      (at most ``frames_per_call``); nothing here waits for more.
    - Frames are rescaled, segmented and cropped one after another in a
      prefetch thread (``prefetch``) while the main thread embeds the crops
      gathered so far in full batches of ``batch_size``; the remainder is
      embedded at the end. The GPU works while the CPU segments.
    - ``ahead``: frames a :class:`SegmentAhead` already started to segment (while the
      previous call embedded) are taken from it, not segmented again.
    - A frame-context encoder (:class:`FrameEncoder`, e.g. SAM in its fast
      mode) embeds each frame's cells from the frame itself.
    - A frame whose crops are all embedded is classified (EWC, control,
      counts) in a second thread while later crops are embedded.
    - If a shared encoder call fails (other than out of memory, which
      :mod:`monitor.batching` absorbs), every frame not yet fully embedded is
      embedded on its own, so the failure lands on the frame that caused it.
    - ``stage_seconds["embed"]`` of a frame is its share, by crop count, of
      the shared calls plus its own frame-context encoders.
    """
    n = len(frames)
    out: list[Counts | StageError | None] = [None] * n
    crop_encs = [e for e in p.encoders if not isinstance(e, FrameEncoder)]
    segmented: dict[int, _Segmented] = {}
    rows: dict[int, list[np.ndarray]] = {}
    shared_s: dict[int, float] = {}
    buf: list[tuple[int, np.ndarray]] = []  # (frame, crops) not yet embedded
    shared_ok = True

    def flush(final: bool) -> None:
        nonlocal buf, shared_ok
        total = sum(len(c) for _, c in buf)
        take = total if final else total - total % p.batch_size
        if take == 0 or not shared_ok:
            return
        taken, rest, k = [], [], take
        for i, c in buf:
            m = min(k, len(c))
            if m:
                taken.append((i, c[:m]))
            if m < len(c):
                rest.append((i, c[m:]))
            k -= m
        crops = np.concatenate([c for _, c in taken])
        t = time.perf_counter()
        try:
            v = _embed_crops(crops, crop_encs, p.batch_size, p.oom)
        except Exception:  # re-done frame by frame below, so the error names its frame
            shared_ok = False
            return
        dt, o = time.perf_counter() - t, 0
        for i, c in taken:
            rows[i].append(v[o : o + len(c)])
            shared_s[i] += dt * len(c) / len(crops)
            o += len(c)
        buf = rest

    threaded = p.prefetch and n > 1
    pool = ThreadPoolExecutor(1, thread_name_prefix="segment") if threaded else None
    finisher = ThreadPoolExecutor(1, thread_name_prefix="classify") if threaded else None
    finishing: dict[int, Future[Counts]] = {}

    def finish_complete(final: bool) -> None:
        """Classify (in the finisher thread) every frame whose crops are all embedded."""
        for i, sg in segmented.items():
            if i in finishing or (not final and sum(len(r) for r in rows[i]) < len(sg.crops)):
                continue
            if finisher is not None:
                finishing[i] = finisher.submit(_finish, sg, rows[i], shared_s[i], crop_encs, p)

    try:
        started = [ahead.take(f) if ahead is not None else None for f in frames]
        futures = [s or (pool.submit(_segment, f, p) if pool is not None else None) for f, s in zip(frames, started, strict=True)]
        for i, f in enumerate(frames):
            try:
                fut = futures[i]
                sg = fut.result() if fut is not None else _segment(f, p)
            except StageError as e:
                out[i] = e
                continue
            segmented[i], rows[i], shared_s[i] = sg, [], 0.0
            buf.append((i, sg.crops))
            flush(final=False)
            finish_complete(final=False)
        flush(final=True)
        finish_complete(final=True)
        for i, sg in segmented.items():
            try:
                out[i] = finishing[i].result() if i in finishing else _finish(sg, rows[i], shared_s[i], crop_encs, p)
            except StageError as e:
                out[i] = e
    finally:
        for ex in (pool, finisher):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
    return [r for r in out if r is not None]


def cell_embeddings(frame: Frame, cells: Cells, crop_vectors: np.ndarray, encoders: Sequence[Encoder]) -> Embeddings:
    """Each cell's vector in the configured encoder order (the order the index was built in).

    ``crop_vectors`` holds the crop encoders' columns, concatenated in their
    order; a :class:`FrameEncoder` (which embeds cells from the whole frame,
    e.g. SAM's fast mode) is called here and its columns put in its place.
    """
    in_frame = {}
    for j, enc in enumerate(encoders):
        if isinstance(enc, FrameEncoder):
            v = np.asarray(enc.encode_cells(frame, cells), dtype=np.float32)
            if v.shape != (len(cells), enc.dim):
                raise RuntimeError(f"encoder {enc.name} returned shape {v.shape}, expected ({len(cells)}, {enc.dim})")
            in_frame[j] = v
    vectors = in_encoder_order(encoders, crop_vectors, in_frame)
    return Embeddings(vectors, tuple(e.id for e in encoders), tuple(e.dim for e in encoders))


def in_encoder_order(encoders: Sequence[Encoder], crop_vectors: np.ndarray, frame_vectors: Mapping[int, np.ndarray]) -> np.ndarray:
    """The columns in the configured encoder order: ``frame_vectors[j]`` where encoder ``j`` embeds
    cells in their frame, else the next ``dim`` columns of ``crop_vectors`` (the crop encoders'
    columns, concatenated in their order)."""
    blocks, o = [], 0
    for j, enc in enumerate(encoders):
        if j in frame_vectors:
            blocks.append(frame_vectors[j])
        else:
            blocks.append(crop_vectors[:, o : o + enc.dim])
            o += enc.dim
    vectors = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(crop_vectors), 0), np.float32)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def embed_cells(frame: Frame, cells: Cells, crops: np.ndarray, encoders: Sequence[Encoder], batch_size: int = 64,
                policy: OomPolicy | None = None) -> Embeddings:
    """One frame's cells embedded as the service does: the crop encoders on ``crops`` (one batched
    call), each frame encoder on the cells in their frame, columns in the configured order."""
    crop_encs = [e for e in encoders if not isinstance(e, FrameEncoder)]
    crop_v = _embed_crops(crops, crop_encs, batch_size, policy) if crop_encs else np.zeros((len(crops), 0), np.float32)
    return cell_embeddings(frame, cells, crop_v, encoders)


def _finish(sg: _Segmented, rows: list[np.ndarray], shared_s: float, crop_encs: list[Encoder], p: Pipeline) -> Counts:
    """Embedding columns in configured order, EWC, control and counts for one segmented frame."""
    s, frame = dict(sg.seconds), sg.frame
    local: dict[str, float] = {}
    with _stage("embed", local):
        got = sum(len(r) for r in rows)
        if got == len(sg.crops):
            crop_v = np.concatenate(rows) if rows else np.zeros((len(sg.crops), sum(e.dim for e in crop_encs)), np.float32)
        else:  # the shared call failed: this frame alone
            crop_v = _embed_crops(sg.crops, crop_encs, p.batch_size, p.oom)
        emb = cell_embeddings(frame, sg.cells, crop_v, p.encoders)
    s["embed"] = shared_s + local["embed"]
    with _stage("classify", s):
        states = p.classifier.classify(emb)
    with _stage("control", s):
        control = None
        if p.control_enabled and frame.control is not None:
            control = otsu_control(frame.channels[frame.control], frame.pixel_size_um, frame.control, p.control_min_region_px, p.control_min_snr)
    marker = verdicts = None
    if p.marker is not None:
        with _stage("marker", s):
            verdicts = p.marker.verdicts(frame, sg.cells)
            marker = p.marker.agreement(frame, sg.cells, states, verdicts)
    calls = None
    if p.keep_calls:
        cs = sg.cells.cells
        calls = CellCalls(frame.image, sg.cells.labels, np.array([c.id for c in cs], dtype=np.int64), states.predicted,
                          states.uncertain, states.classes, frame.pixel_size_um, certainty=states.certainty,
                          unknown=states.unknown, centroid_yx_px=np.array([c.centroid_yx_px for c in cs], dtype=np.float64).reshape(-1, 2),
                          area_um2=np.array([c.area_um2 for c in cs], dtype=np.float64),
                          marker_values=verdicts[0] if verdicts else None, marker_labels=verdicts[1] if verdicts else None)
    return count_states(frame, states, control, s, marker, calls)
