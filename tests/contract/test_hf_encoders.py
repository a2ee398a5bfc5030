"""HF foundation encoders through the real loader, with tiny random-weight models of the real classes."""

from __future__ import annotations

import sys

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


@pytest.mark.parametrize("family", ["dinov2", "convnextv2", "swinv2", "clip", "vit-mae"])
def test_tensor_preprocessing_is_the_processors_own(family):
    """Resize, crop and normalise as batched tensor work give the processor's pixels (within one grey level)."""
    import torch
    from cellmonitor_plugins.encoders.hf import TensorPrep
    from skimage import data

    from monitor.imaging import display_range

    _, proc, _ = tiny(family)
    rgb = display_range(data.cell())  # a real phase image: smooth, like a cell crop
    prep = TensorPrep(proc)
    for size in (224, 48, 24):  # down-, down- and up-scaling to the model's 32 px
        crops = np.stack([rgb[i * 40 : i * 40 + size, i * 30 : i * 30 + size] for i in range(3)])
        want = proc(images=list(crops), return_tensors="pt")["pixel_values"]
        got = prep(torch.from_numpy(crops).permute(0, 3, 1, 2))
        assert got.shape == want.shape and got.dtype == torch.float32
        one_level = 1 / 255 / min(proc.image_std)
        assert float((got - want).abs().max()) <= one_level + 1e-4
        assert float((got - want).abs().mean()) < 0.25 * one_level  # most pixels equal


def test_precision_and_attention_options(tmp_path):
    model, proc, _ = tiny("dinov2")
    folder = tmp_path / "tiny-dinov2"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    build = lambda **o: Registry().build("encoders", PluginRef(name="dinov2", options={"model": str(folder), **o}), BuildContext(state_dir=tmp_path))  # noqa: E731
    plain, amp, eager = build(), build(autocast="bfloat16"), build(attention="eager")
    assert plain.attention == "sdpa" and eager.attention == "eager"
    assert plain.id.endswith(":float32") and amp.id.endswith(":float32+autocast-bfloat16")  # an index knows the precision
    crops = np.random.default_rng(0).integers(0, 255, (4, 40, 40, 3), dtype=np.uint8)
    v, va, ve = plain.encode(crops), amp.encode(crops), eager.encode(crops)
    np.testing.assert_allclose(ve, v, rtol=1e-4, atol=1e-5)  # SDPA is the same maths
    assert not np.array_equal(va, v) and np.allclose(va, v, atol=0.1)  # bf16 matmuls: close, not equal


def test_describe_reads_config_json_without_loading(tmp_path):
    from cellmonitor_plugins.encoders.hf import CONVNEXTV2, Options

    model, proc, dim = tiny("convnextv2")
    folder = tmp_path / "tiny-convnextv2"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    d = CONVNEXTV2.describe(Options(model=str(folder), dtype="bfloat16"), BuildContext(state_dir=tmp_path))
    assert d == {"present": True, "where": str(folder), "dim": dim, "dtype": "bfloat16"}
    missing = CONVNEXTV2.describe(Options(), BuildContext(state_dir=tmp_path))
    assert missing["present"] is False and missing["dim"] == 1536 and "facebook/convnextv2-large-22k-224" in missing["where"]


def test_a_missing_extra_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on a CPU install without the hf extra
    with pytest.raises(PluginError) as e:
        Registry().build("encoders", PluginRef(name="dinov2"), BuildContext(state_dir=tmp_path))
    assert "\n" not in str(e.value) and "needs the transformers package" in str(e.value) and "pip install 'cellmonitor[hf]'" in str(e.value)


@pytest.mark.parametrize("family", ["dinov2", "clip", "vit-mae"])
def test_cls_plus_mean_patch_tokens_from_the_last_blocks(tmp_path, family):
    """tokens = "cls+mean": per block (last first), the normed CLS token then the mean normed patch token; in the id."""
    import torch

    model, proc, _ = tiny(family)
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    ctx = BuildContext(state_dir=tmp_path)
    plain = Registry().build("encoders", PluginRef(name=family, options={"model": str(folder)}), ctx)
    one = Registry().build("encoders", PluginRef(name=family, options={"model": str(folder), "tokens": "cls+mean"}), ctx)
    two = Registry().build("encoders", PluginRef(name=family, options={"model": str(folder), "tokens": "cls+mean", "layers": 2}), ctx)
    assert (one.dim, two.dim) == (64, 128)
    assert len({plain.id, one.id, two.id}) == 3 and ":cls+mean-l2" in two.id
    crops = np.random.default_rng(0).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    v1, v2 = check_encoder(one, n=3, size=48), two.encode(crops)
    assert v1.shape == (3, 64) and v2.shape == (3, 128)
    # by hand, from the model's own hidden states and final norm
    m = two.model
    with torch.inference_mode():
        hs = m(pixel_values=two.prepare(crops).float(), output_hidden_states=True).hidden_states
        norm = getattr(m, "vision_model", m).post_layernorm if family == "clip" else m.layernorm
        want = torch.cat([norm(hs[-1])[:, 0], norm(hs[-1])[:, 1:].mean(1), norm(hs[-2])[:, 0], norm(hs[-2])[:, 1:].mean(1)], 1).numpy()
    np.testing.assert_allclose(v2, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one.encode(crops), v2[:, :64], rtol=1e-4, atol=1e-5)  # the last block comes first
    if family == "dinov2":  # its pooler is the normed CLS token: the first part
        np.testing.assert_allclose(v2[:, :32], plain.encode(crops), rtol=1e-4, atol=1e-5)


def test_cls_plus_mean_refused_where_there_is_no_cls_token(tmp_path):
    model, proc, _ = tiny("convnextv2")
    folder = tmp_path / "tiny-convnextv2"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    with pytest.raises(PluginError, match="needs a CLS token"):
        Registry().build("encoders", PluginRef(name="convnextv2", options={"model": str(folder), "tokens": "cls+mean"}), BuildContext(state_dir=tmp_path))
    model, proc, _ = tiny("dinov2")
    model.save_pretrained(tmp_path / "d")
    proc.save_pretrained(tmp_path / "d")
    with pytest.raises(PluginError, match="layers = 5 but the model has 2"):
        Registry().build("encoders", PluginRef(name="dinov2", options={"model": str(tmp_path / "d"), "tokens": "cls+mean", "layers": 5}), BuildContext(state_dir=tmp_path))
