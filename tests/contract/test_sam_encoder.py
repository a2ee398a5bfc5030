"""SAM image encoder through the real plugin path, with the tiny random SAM of test_sam."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.config import PluginRef
from monitor.errors import PluginError
from monitor.protocols import BuildContext
from monitor.registry import Registry
from monitor.testing import check_encoder


def test_tiny_sam_encoder(tiny_checkpoint, tmp_path):  # fixture from tests/fixtures/tiny_sam.py
    enc = Registry().build(
        "encoders", PluginRef(name="sam", options={"model_type": "tiny_test", "checkpoint": str(tiny_checkpoint)}), BuildContext(state_dir=tmp_path)
    )
    assert enc.dim == 32 and enc.size == 64
    v = check_encoder(enc, n=2, size=48)
    assert not np.allclose(v[0], v[1])
    assert enc.id.startswith("sam-tiny_test@") and enc.id.endswith(":64px:mean-image-embedding")


def test_missing_checkpoint_names_the_encoder(tmp_path):
    with pytest.raises(PluginError) as e:
        Registry().build("encoders", PluginRef(name="sam"), BuildContext(state_dir=tmp_path))
    msg = str(e.value)
    assert "encoder sam: checkpoint not found at" in msg and "sam_vit_h_4b8939.pth" in msg and "[encoders.options]" in msg


# ---- fast mode: the frame's own embedding pooled under each cell's mask -------


def test_pool_under_masks_maps_mask_pixels_to_their_patches():
    from cellmonitor_plugins.encoders.sam import pool_under_masks

    g = 4
    gy, gx = np.mgrid[0:g, 0:g].astype(np.float32)
    features = np.stack([gx, gy])  # channel 0 = patch column, channel 1 = patch row
    labels = np.zeros((80, 96), np.int32)  # resized by ResizeLongestSide(64) to (53, 64): 2/3
    labels[0:10, 0:10] = 1  # patch (0, 0)
    labels[60:70, 80:96] = 2  # rows 40.1..46.0 -> patch row 2 (not 3: the rows scale by 53/80), columns 53.7..63.7 -> 3
    labels[0:4, 20:28] = 3  # columns 20..23 fall in patch column 0, 24..27 in column 1: half each
    labels[70:80, 0:5] = 4  # not asked for
    v = pool_under_masks(features, labels, [2, 1, 3], (53, 64), 64)
    np.testing.assert_allclose(v, [[3, 2], [0, 0], [0.5, 0]], atol=1e-6)


def _sam_pair(tiny_checkpoint, tmp_path, segmenter: str):
    from monitor.config import PluginRef

    ctx = BuildContext(state_dir=tmp_path, device="cpu")
    reg = Registry()
    ck = str(tiny_checkpoint)
    seg_opts = {"model_type": "tiny_test", "checkpoint": ck, "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "min_area_um2": 0.0, "max_area_um2": 1e9}
    seg = reg.build("segmenters", PluginRef(name=segmenter, options=seg_opts if segmenter == "sam" else {}), ctx)
    enc = reg.build("encoders", PluginRef(name="sam", options={"model_type": "tiny_test", "checkpoint": ck, "mode": "fast"}), ctx)
    return seg, enc


def test_fast_mode_pools_the_frames_own_sam_embedding(tiny_checkpoint, tmp_path):
    from cellmonitor_plugins.encoders.sam import pool_under_masks
    from fixtures.service import blobs
    from segment_anything import SamPredictor

    from monitor.imaging import display_range
    from monitor.pipeline import Pipeline, process_frames
    from monitor.records import Frame, FrameKey
    from monitor.testing import DiscSegmenter

    seg, enc = _sam_pair(tiny_checkpoint, tmp_path, "classical")
    assert enc.id.startswith("sam-tiny_test@") and enc.id.endswith(":64px:frame-mask-pool") and not enc.shared
    frames = [Frame(FrameKey("e", "A1", "1", t), {"phase": blobs(6, 0.8, seed=t)}, "phase", None, 0.322, "config", "test") for t in range(2)]
    seen = []

    class Capture:
        classes = ("a",)

        def classify(self, emb):
            from monitor.records import States

            seen.append(emb.vectors)
            n = len(emb)
            z = np.zeros((n, 1))
            return States(self.classes, np.zeros(n, np.int64), np.ones(n), np.ones(n, np.int64), np.zeros(n, bool), z.astype(np.int64), z.astype(np.int64), z.astype(np.float32))

    disc = DiscSegmenter()
    out = process_frames(frames, Pipeline(disc, [enc], Capture(), pixel_size_um=0.322, crop_px=24))
    assert [c.n_cells for c in out] == [6, 6]
    assert enc.embeddings.computed == 2  # one image-encoder pass per frame, not per cell
    pred = SamPredictor(enc.model)
    for f, v in zip(frames, seen, strict=True):
        pred.set_image(display_range(f.image))  # SAM's own path to the frame's embedding
        cells = disc.segment(f)
        want = pool_under_masks(pred.features[0], cells.labels, [c.id for c in cells.cells], pred.input_size, 64)
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6)
        assert v.shape == (6, 32) and np.isfinite(v).all()
        assert not np.allclose(v[0], v[5])  # cells at different places, different vectors
    v = check_encoder(enc, n=2, size=48)  # crops without a frame still embed (reference sets, warm-up)
    assert v.shape == (2, 32)


def test_fast_mode_shares_model_and_embedding_with_the_sam_segmenter(tiny_checkpoint, tmp_path):
    from fixtures.service import blobs

    from monitor.pipeline import Pipeline, process_frame
    from monitor.records import Frame, FrameKey

    seg, enc = _sam_pair(tiny_checkpoint, tmp_path, "sam")
    assert enc.shared and enc.model is seg.model and enc.embeddings is seg.embeddings  # loaded once
    img = blobs(6, 0.8, seed=0)
    f = Frame(FrameKey("e", "A1", "1", 0), {"phase": img}, "phase", None, 0.322, "config", "test")
    cells = seg.segment(f)
    assert seg.embeddings.computed == 1
    v = enc.encode_cells(f, cells)
    assert seg.embeddings.computed == 1  # the segmenter's embedding, not a second pass
    assert len(cells) > 0 and v.shape == (len(cells), 32) and np.isfinite(v).all()

    class One:
        classes = ("a",)

        def classify(self, emb):
            from monitor.records import States

            n = len(emb)
            z = np.zeros((n, 1))
            return States(self.classes, np.zeros(n, np.int64), np.ones(n), np.ones(n, np.int64), np.zeros(n, bool), z.astype(np.int64), z.astype(np.int64), z.astype(np.float32))

    before = seg.embeddings.computed
    process_frame(f, Pipeline(seg, [enc], One(), pixel_size_um=0.322, crop_px=24))
    assert seg.embeddings.computed == before  # same frame object: still cached (segmenter and encoder share it)


@pytest.mark.parametrize(("kind", "who"), [("segmenters", "segmenter sam"), ("encoders", "encoder sam")])
def test_a_missing_sam_extra_is_one_line(tmp_path, monkeypatch, kind, who):
    import sys

    monkeypatch.setitem(sys.modules, "segment_anything", None)
    with pytest.raises(PluginError) as e:
        Registry().build(kind, PluginRef(name="sam"), BuildContext(state_dir=tmp_path))
    assert str(e.value).endswith("pip install 'cellmonitor[sam]'") and who in str(e.value) and "\n" not in str(e.value)
