"""Batching across cells and frames, the CUDA out-of-memory policy (simulated), determinism, device choice."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from fixtures.service import blobs

from monitor.batching import OomPolicy, encode_all
from monitor.device import resolve_device
from monitor.errors import ConfigError, StageError
from monitor.imaging import crop_cells, rescale
from monitor.pipeline import Pipeline, embed, process_frame, process_frames
from monitor.records import Embeddings, Frame, FrameKey, States
from monitor.testing import DiscSegmenter, MeanColourEncoder


def frame(t: int, n: int, bright: float = 0.8, noise: float = 0.0) -> Frame:
    img = blobs(n, bright, seed=t)
    img += np.random.default_rng(t).normal(0, noise, img.shape).astype(np.float32) if noise else 0
    return Frame(FrameKey("e", "A1", "1", t), {"phase": img}, "phase", None, 0.322, "config", "test")


class Capture:
    """A classifier that keeps every embedding it is given; state = first coordinate above its median."""

    classes = ("low", "high")

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def classify(self, emb: Embeddings) -> States:
        v = emb.vectors
        self.seen.append(v.copy())
        n = len(v)
        pred = (v[:, 0] > 0.3).astype(np.int64) if n else np.zeros(0, np.int64)
        e = np.zeros((n, 1))
        return States(self.classes, pred, np.ones(n), np.ones(n, np.int64), np.zeros(n, bool), e.astype(np.int64), e.astype(np.int64), e.astype(np.float32))


def pipe(encoders, batch_size: int = 4, **kw) -> Pipeline:
    return Pipeline(DiscSegmenter(), encoders, Capture(), pixel_size_um=0.322, crop_px=24, batch_size=batch_size, **kw)


def same_counts(a, b) -> None:
    assert np.isnan(a.mean_certainty) == np.isnan(b.mean_certainty)
    if np.isnan(a.mean_certainty):
        a, b = replace(a, mean_certainty=0.0), replace(b, mean_certainty=0.0)
    assert replace(a, stage_seconds={}) == replace(b, stage_seconds={})


# ---- batching across frames -------------------------------------------------


def test_frames_share_encoder_calls_and_count_as_alone() -> None:
    frames = [frame(t, n) for t, n in enumerate([5, 3, 6, 0, 4])]
    alone_enc, shared_enc = MeanColourEncoder(), MeanColourEncoder()
    alone = [process_frame(f, pipe([alone_enc])) for f in frames]
    shared = process_frames(frames, pipe([shared_enc]))
    assert [c.n_cells for c in alone] == [5, 3, 6, 0, 4]
    for a, s in zip(alone, shared, strict=True):
        same_counts(a, s)
    # 18 crops in batches of 4 across frames: 5 calls; frame by frame: 2 + 1 + 2 + 0 + 1 = 6
    assert shared_enc.calls == 5 and alone_enc.calls == 6
    assert all(c.stage_seconds["embed"] >= 0 for c in shared)


def test_a_failing_frame_does_not_take_the_others_down() -> None:
    class Picky(DiscSegmenter):
        def segment(self, f: Frame):
            if f.key.timepoint == 1:
                raise ValueError("bad frame")
            return super().segment(f)

    class Poisoned(MeanColourEncoder):
        def encode(self, crops):
            c = np.asarray(crops)
            if (c.max(axis=(1, 2, 3)) == c.min(axis=(1, 2, 3))).any():  # a flat crop: only frame 3 has them
                raise RuntimeError("poisoned crop")
            return super().encode(crops)

    frames = [frame(t, 3, noise=0.0 if t == 3 else 0.05) for t in range(5)]
    p = pipe([Poisoned()])
    p.segmenter = Picky()
    p.crop_px = 4  # crops inside the flat blobs of frame 3 are flat; the others are noisy
    out = process_frames(frames, p)
    assert isinstance(out[1], StageError) and out[1].stage == "segment"
    assert isinstance(out[3], StageError) and out[3].stage == "embed"
    assert [type(r).__name__ for r in out] == ["Counts", "StageError", "Counts", "StageError", "Counts"]
    for i in (0, 2, 4):
        same_counts(out[i], process_frame(frames[i], replace(p, segmenter=DiscSegmenter(), encoders=[MeanColourEncoder()])))


def tiny_dinov2(tmp_path):
    import transformers as tf

    from monitor.config import PluginRef
    from monitor.protocols import BuildContext
    from monitor.registry import Registry

    torch.manual_seed(0)
    cfg = tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    folder = tmp_path / "tiny-dinov2"
    tf.Dinov2Model(cfg).save_pretrained(folder)
    tf.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return Registry().build("encoders", PluginRef(name="dinov2", options={"model": str(folder)}), BuildContext(state_dir=tmp_path))


def test_a_crop_alone_and_inside_a_batch_across_frames_gives_the_same_vector(tmp_path) -> None:
    enc = tiny_dinov2(tmp_path)
    frames = [frame(t, n) for t, n in enumerate([5, 4, 6])]
    p = pipe([enc], batch_size=8)
    process_frames(frames, p)
    batched = np.concatenate(p.classifier.seen)
    crops = np.concatenate([crop_cells(f, DiscSegmenter().segment(f), 24) for f in map(lambda f: rescale(f, 0.322), frames)])
    assert len(crops) == len(batched) == 15
    alone = np.concatenate([enc.encode(c[None]) for c in crops])
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-5)
    assert not np.allclose(alone[0], alone[1])  # the comparison can fail: the vectors differ by crop


def test_embedding_is_deterministic(tmp_path) -> None:
    enc = tiny_dinov2(tmp_path)
    frames = [frame(t, 4) for t in range(3)]
    runs = []
    for _ in range(2):
        p = pipe([enc], batch_size=5)
        process_frames(frames, p)
        runs.append(np.concatenate(p.classifier.seen))
    assert np.array_equal(runs[0], runs[1])  # bit for bit on the same machine and batch plan


# ---- prefetch ---------------------------------------------------------------


class Split(MeanColourEncoder):
    """prepare/encode_prepared encoder: records the thread each half runs in."""

    prefetches = True

    def __init__(self) -> None:
        super().__init__()
        self.prepared_in: list[str] = []

    def prepare(self, crops):
        self.prepared_in.append(threading.current_thread().name)
        return np.asarray(crops).copy()

    def encode_prepared(self, x):
        return self.encode(x)


def test_prefetch_prepares_the_next_chunk_in_a_helper_thread() -> None:
    crops = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 3), dtype=np.uint8)
    enc = Split()
    v = encode_all(enc, crops, 3)
    np.testing.assert_array_equal(v, MeanColourEncoder().encode(crops))
    assert enc.calls == 4
    assert enc.prepared_in[0] == threading.current_thread().name
    assert all(t.startswith("prefetch") for t in enc.prepared_in[1:]) and len(enc.prepared_in) == 4


# ---- out of memory (simulated) ----------------------------------------------


class OomAbove(MeanColourEncoder):
    """Raises CUDA OOM for batches above ``limit`` while on 'cuda' (a simulated GPU)."""

    def __init__(self, limit: int, device: str = "cuda", movable: bool = True) -> None:
        super().__init__()
        self.limit, self.device, self.sizes = limit, device, []
        self.movable = movable

    def encode(self, crops):
        self.sizes.append(len(crops))
        if self.device == "cuda" and len(crops) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(crops)} crops")
        return super().encode(crops)

    def to_device(self, device: str) -> bool:
        if not self.movable:
            return False
        self.device = device
        return True


CROPS = np.random.default_rng(1).integers(0, 255, (50, 8, 8, 3), dtype=np.uint8)


def test_oom_halves_the_batch_retries_and_remembers(caplog) -> None:
    enc, policy = OomAbove(limit=8), OomPolicy()
    with caplog.at_level(logging.INFO, "monitor.batching"):
        v = encode_all(enc, CROPS, 32, policy)
    np.testing.assert_array_equal(v, MeanColourEncoder().encode(CROPS))  # no crop lost, none twice
    assert enc.sizes[:3] == [32, 16, 8] and set(enc.sizes[3:]) <= {8, 2}
    assert policy.limits[id(enc)] == 8 and enc.device == "cuda"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    enc.sizes.clear()
    encode_all(enc, CROPS, 32, policy)
    assert max(enc.sizes) == 8  # the learnt size is kept: no OOM again


def test_oom_at_batch_one_falls_back_to_cpu_with_one_warning(caplog) -> None:
    enc, policy = OomAbove(limit=0), OomPolicy()
    with caplog.at_level(logging.INFO, "monitor.batching"):
        v1 = encode_all(enc, CROPS, 16, policy)
        v2 = encode_all(enc, CROPS, 16, policy)
    np.testing.assert_array_equal(v1, MeanColourEncoder().encode(CROPS))
    np.testing.assert_array_equal(v2, v1)
    assert enc.device == "cpu"
    assert enc.sizes[:6] == [16, 8, 4, 2, 1, 16]  # halved to 1, then the CPU at the full batch
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CPU" in warnings[0]


def test_oom_with_no_way_out_quarantines_the_frame_not_the_service() -> None:
    p = pipe([OomAbove(limit=0, movable=False)])
    with pytest.raises(StageError) as e:
        process_frame(frame(0, 3), p)
    assert e.value.stage == "embed" and isinstance(e.value.cause, torch.cuda.OutOfMemoryError)


def test_other_errors_are_not_mistaken_for_oom() -> None:
    class Broken(MeanColourEncoder):
        def encode(self, crops):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        embed(CROPS, [Broken()], 8)


# ---- device ------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_cuda_without_a_gpu_is_a_start_up_error_unless_fallback_is_asked(caplog) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_device("cuda")
    msg = str(e.value)
    assert e.value.exit_status == 78 and "\n" not in msg
    assert msg.startswith("pipeline.device = 'cuda' but no usable GPU") and "cuda-or-cpu" in msg
    with caplog.at_level(logging.INFO, "monitor.device"):
        assert resolve_device("cuda-or-cpu") == "cpu"
        assert resolve_device("auto") == "cpu"
        assert resolve_device("cpu") == "cpu"
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]  # the asked-for fallback warns
