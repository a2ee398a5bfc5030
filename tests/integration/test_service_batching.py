"""Frames that queue up (a backlog at start-up) share encoder calls in the service, and count as alone."""

from __future__ import annotations

import threading
import time

from fixtures.service import blobs, drop, make_service


def test_queued_frames_share_encoder_calls_and_are_each_recorded(tmp_path):
    svc, sink = make_service(tmp_path)
    for t in range(1, 6):  # written while the service was down: one backlog
        drop(svc.settings.watch_dir, f"A1_t{t}_phase.npy", blobs(t, 0.9, seed=t))
    enc = svc.pipeline.encoders[0]
    before = enc.calls  # make_service embedded its reference cells with it
    svc.pipeline.frames_per_call = 4
    svc.run(threading.Event(), until_idle=True, observe=False)
    svc.close()
    assert sorted((c.key.timepoint, c.n_cells) for c in sink.rows) == [(t, t) for t in range(1, 6)]
    assert enc.calls - before <= 3  # frames share calls (how many per call depends on how the backlog is collected); alone: 5
    assert svc.counted == 5 and svc.failed == 0

    alone, sink2 = make_service(tmp_path / "alone")
    for t in range(1, 6):
        drop(alone.settings.watch_dir, f"A1_t{t}_phase.npy", blobs(t, 0.9, seed=t))
    alone.pipeline.frames_per_call = 1
    before = alone.pipeline.encoders[0].calls
    alone.run(threading.Event(), until_idle=True, observe=False)
    alone.close()
    assert alone.pipeline.encoders[0].calls - before == 5
    key = lambda c: c.key.timepoint  # noqa: E731
    for a, b in zip(sorted(sink2.rows, key=key), sorted(sink.rows, key=key), strict=True):
        assert (a.counts, a.n_cells, a.n_uncertain) == (b.counts, b.n_cells, b.n_uncertain)


def test_a_backlog_segments_the_next_call_while_this_one_embeds(tmp_path):
    """Across calls the two stages overlap: the next call's first frame is segmented (in the
    segment-ahead thread) while this call's crops are embedded; every frame is segmented once,
    and the counts are those of frames processed alone."""
    svc, sink = make_service(tmp_path)
    for t in range(1, 7):
        drop(svc.settings.watch_dir, f"A1_t{t}_phase.npy", blobs(t, 0.9, seed=t))
    svc.pipeline.frames_per_call = 2
    seg, enc = svc.pipeline.segmenter, svc.pipeline.encoders[0]
    real_segment, real_encode = seg.segment, enc.encode
    ahead_started = threading.Event()
    segmented: list[tuple[int, str]] = []
    seen_while_embedding: list[bool] = []

    def segment(frame):
        name = threading.current_thread().name
        if name.startswith("segment-ahead"):
            ahead_started.set()
        segmented.append((frame.key.timepoint, name))
        return real_segment(frame)

    def encode(crops):
        if not seen_while_embedding:  # the first call's embedding waits (bounded) for the next call's segmentation
            ahead_started.wait(30)
        seen_while_embedding.append(ahead_started.is_set())
        return real_encode(crops)

    seg.segment, enc.encode = segment, encode
    svc.run(threading.Event(), until_idle=True, observe=False)
    svc.close()
    assert seen_while_embedding[0], "no frame was segmented ahead while the first call embedded"
    assert sorted(t for t, _ in segmented) == list(range(1, 7))  # each frame segmented exactly once
    assert sum(name.startswith("segment-ahead") for _, name in segmented) >= 1
    assert sorted((c.key.timepoint, c.n_cells) for c in sink.rows) == [(t, t) for t in range(1, 7)]


def test_a_backlog_is_read_a_few_calls_at_a_time_and_no_channel_is_lost(tmp_path):
    """A plate that lands at once is read at most read_per_step files a step (memory holds a few
    calls' pixels, not the backlog's), and a frame whose second channel is left for the next step
    is not released without it, even with wait_s = 0."""
    from monitor.service.loop import Service

    svc, sink = make_service(tmp_path, channels=["phase", "gfp"], wait_s=0.0)
    svc.read_per_step = 3  # odd: frames are split across steps
    for t in range(1, 6):
        drop(svc.settings.watch_dir, f"A1_t{t}_phase.npy", blobs(t, 0.9, seed=t))
        drop(svc.settings.watch_dir, f"A1_t{t}_gfp.npy", blobs(t, 0.5, seed=t))
    svc.backlog()
    read = []
    real = Service._read

    def counting_read(self, p):
        read.append(p)
        return real(self, p)

    svc._read = counting_read.__get__(svc)
    steps = 0
    while len(sink.rows) < 5:
        before = len(read)
        svc.step()
        assert len(read) - before <= 3
        steps += 1
        assert steps < 500, "the backlog was never counted"
        time.sleep(0.06)  # stable_s = 0.05
    svc.close()
    assert sorted((c.key.timepoint, c.n_cells) for c in sink.rows) == [(t, t) for t in range(1, 6)]
    assert all(not c.missing_channels for c in sink.rows), [c.missing_channels for c in sink.rows]
