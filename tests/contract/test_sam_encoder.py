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
