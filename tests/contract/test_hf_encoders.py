"""HF foundation encoders through the real loader, with tiny random-weight models of the real classes."""

from __future__ import annotations

import numpy as np
import pytest
import transformers as tf

from monitor.config import PluginRef
from monitor.errors import PluginError
from monitor.protocols import BuildContext
from monitor.registry import Registry
from monitor.testing import check_encoder


def tiny(family: str):
    """(model, processor) of the real architecture with tiny dims, 32 px input."""
    size = {"height": 32, "width": 32}
    if family == "dinov2":
        cfg = tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
        return tf.Dinov2Model(cfg), tf.BitImageProcessor(size={"shortest_edge": 32}, crop_size=size), 32
    if family == "convnextv2":
        cfg = tf.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
        return tf.ConvNextV2Model(cfg), tf.ConvNextImageProcessor(size={"shortest_edge": 32}), 16
    if family == "swinv2":
        cfg = tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
        return tf.Swinv2Model(cfg), tf.ViTImageProcessor(size=size), 16
    if family == "clip":
        cfg = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
        return tf.CLIPVisionModel(cfg), tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=size), 32
    cfg = tf.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32)
    return tf.ViTMAEModel(cfg), tf.ViTImageProcessor(size=size), 32


@pytest.mark.parametrize("family", ["dinov2", "convnextv2", "swinv2", "clip", "vit-mae"])
def test_tiny_model_loads_through_the_plugin(tmp_path, family):
    model, proc, dim = tiny(family)
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    enc = Registry().build("encoders", PluginRef(name=family, options={"model": str(folder)}), BuildContext(state_dir=tmp_path))
    assert enc.dim == dim
    v = check_encoder(enc, n=3, size=48)  # shape, dtype, finite, deterministic (ViT-MAE: mask_ratio 0)
    assert not np.allclose(v[0], v[1])  # different crops, different embeddings
    assert enc.id.startswith(f"{family}:tiny-{family}@")
    if family == "vit-mae":
        assert enc.model.config.mask_ratio == 0.0


def test_missing_weights_say_how_to_provide_them(tmp_path):
    with pytest.raises(PluginError) as e:
        Registry().build("encoders", PluginRef(name="dinov2"), BuildContext(state_dir=tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert "facebook/dinov2-giant: dinov2 weights not found on this machine" in msg
    assert "huggingface-cli download facebook/dinov2-giant --local-dir DIR" in msg


def test_options_are_validated(tmp_path):
    with pytest.raises(PluginError) as e:
        Registry().build("encoders", PluginRef(name="clip", options={"dtype": "int8"}), BuildContext(state_dir=tmp_path))
    assert "encoders.options.dtype" in str(e.value)
