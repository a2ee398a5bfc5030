"""SAM plugin through its real code path with a tiny random SAM (shapes and types only).

The architecture is segment_anything's own (ImageEncoderViT, PromptEncoder,
MaskDecoder, TwoWayTransformer) with small dimensions, registered under a test
model type, saved as a state dict to ``tmp_path`` and loaded by the plugin's
loader. No accuracy is claimed: the weights are random.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
segment_anything = pytest.importorskip("segment_anything")


from monitor.errors import WeightsMissing  # noqa: E402
from monitor.protocols import BuildContext, Segmenter  # noqa: E402
from monitor.records import Cells, Frame, FrameKey  # noqa: E402


def _frame(shape=(80, 96), pixel_size_um: float = 0.5) -> Frame:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4000, size=shape, dtype=np.uint16)
    return Frame(FrameKey("e", "A1", "1", 0), {"phase": img}, "phase", None, pixel_size_um, "config", "test")


def test_tiny_sam_through_plugin(tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cellmonitor_plugins.segmenters.sam import PLUGIN

    opts = PLUGIN.Options(
        model_type="tiny_test", checkpoint=tiny_checkpoint, points_per_side=4, points_per_batch=8,
        pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area_um2=0.0, max_area_um2=1e9,
    )
    with caplog.at_level("WARNING"):
        seg = PLUGIN.build(opts, BuildContext(state_dir=tmp_path, device="cpu"))
    assert any("CPU" in r.getMessage() for r in caplog.records), "CPU use must be warned about"
    assert isinstance(seg, Segmenter)
    # the loaded weights are the saved ones, not a fresh random init
    saved = torch.load(tiny_checkpoint, weights_only=True)
    for k, v in seg.model.state_dict().items():
        assert torch.equal(v.cpu(), saved[k]), k
    frame = _frame()
    cells = seg.segment(frame)
    assert isinstance(cells, Cells)
    assert cells.labels.shape == frame.shape_px
    assert np.issubdtype(cells.labels.dtype, np.integer)
    ids = np.unique(cells.labels)
    assert list(ids[ids > 0]) == [c.id for c in cells.cells] == list(range(1, len(cells) + 1))
    for c in cells.cells:
        assert c.area_um2 == pytest.approx((cells.labels == c.id).sum() * 0.25)


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    from cellmonitor_plugins.segmenters.sam import PLUGIN

    with pytest.raises(WeightsMissing) as ei:
        PLUGIN.build(PLUGIN.Options(), BuildContext(state_dir=tmp_path, device="cpu"))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "sam_vit_h_4b8939.pth" in msg and "checkpoint" in msg
    assert ei.value.exit_status == 78


def test_wrong_checkpoint_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from cellmonitor_plugins.segmenters.sam import PLUGIN

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMissing) as ei:
        PLUGIN.build(PLUGIN.Options(model_type="tiny_test", checkpoint=bad), BuildContext(state_dir=tmp_path))
    assert "\n" not in str(ei.value) and "bad.pth" in str(ei.value)


def test_masks_to_labels_dedup() -> None:
    from cellmonitor_plugins.segmenters.sam import masks_to_labels

    a = np.zeros((10, 10), bool)
    a[1:5, 1:5] = True
    b = a.copy()
    b[1:5, 5] = True  # near-duplicate of a, lower score
    c = np.zeros((10, 10), bool)
    c[6:9, 6:9] = True
    masks = [
        {"segmentation": b, "predicted_iou": 0.8, "stability_score": 0.9},
        {"segmentation": a, "predicted_iou": 0.95, "stability_score": 0.95},
        {"segmentation": c, "predicted_iou": 0.9, "stability_score": 0.9},
    ]
    lab = masks_to_labels(masks, (10, 10))
    assert lab.max() == 2
    assert (lab == 1).sum() == 16 and (lab[1:5, 1:5] == 1).all()
    assert (lab == 2).sum() == 9


def test_plugin_import_is_cheap() -> None:
    import subprocess
    import sys

    code = "import sys, cellmonitor_plugins.segmenters.sam, cellmonitor_plugins.segmenters.classical; print('torch' in sys.modules, 'segment_anything' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
