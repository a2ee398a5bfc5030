"""Frames that queue up (a backlog at start-up) share encoder calls in the service, and count as alone."""

from __future__ import annotations

import threading

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
