"""``cellmonitor models list``: configured models, weights present (where), dim, dtype, device; nothing heavy loaded."""

from __future__ import annotations

import pytest
import transformers as tf

from monitor.cli.main import main


def test_models_list_reports_each_configured_model_without_loading_the_big_ones(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import cellmonitor_plugins.encoders.hf as hf
    import cellmonitor_plugins.segmenters.sam as sam

    def no_load(*a, **k):
        raise AssertionError("models list must not load foundation-model weights")

    monkeypatch.setattr(hf, "load_hf_encoder", no_load)
    monkeypatch.setattr(sam, "load_sam", no_load)
    dino = tmp_path / "tiny-dinov2"
    tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(dino)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"""
[service]
watch_dir = "in"
state_dir = "state"
[pipeline]
device = "auto"
[segmenter]
name = "sam"
options = {{ model_type = "tiny_test", checkpoint = "{tiny_checkpoint}" }}
[[encoders]]
name = "dinov2"
options = {{ model = "{dino}", dtype = "bfloat16" }}
[[encoders]]
name = "convnextv2"
[[encoders]]
name = "sam"
options = {{ mode = "fast" }}
[[encoders]]
name = "efficientnet-lite0"
"""
    )
    status = main(["models", "list", "--config", str(cfg)])
    out = capsys.readouterr().out.splitlines()
    assert status == 1  # convnextv2 and the default SAM checkpoint are missing
    assert out[0].startswith("device: cpu (pipeline.device = auto; no usable GPU") or out[0].startswith("device: cuda")
    rows = {tuple(line.split()[:2]): line.split() for line in out[2:]}
    assert rows[("segmenter", "sam")][2:4] == ["yes", "-"] and str(tiny_checkpoint) in " ".join(rows[("segmenter", "sam")])
    assert rows[("encoder", "dinov2")][2:5] == ["yes", "32", "bfloat16"] and str(dino) in rows[("encoder", "dinov2")]
    assert rows[("encoder", "convnextv2")][2:4] == ["NO", "1536"] and "facebook/convnextv2-large-22k-224" in " ".join(rows[("encoder", "convnextv2")])
    sam_row = rows[("encoder", "sam")]
    assert sam_row[2:5] == ["[fast]", "NO", "256"] and "sam_vit_h_4b8939.pth" in " ".join(sam_row)
    assert rows[("encoder", "efficientnet-lite0")][2:5] == ["yes", "1280", "float32"]
    from cellmonitor_plugins.encoders.runtime import available

    want = "onnxruntime" if available("onnxruntime") else "openvino" if available("openvino") else "torch"
    if out[0].startswith("device: cpu"):  # the RUNTIME column names what runs the CNN encoder
        assert rows[("encoder", "efficientnet-lite0")][6] == want
    assert out[1].split()[6] == "RUNTIME"
    assert len(out) == 2 + 5


def test_models_list_says_when_cuda_would_fail(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a usable GPU")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[service]\nwatch_dir = "in"\nstate_dir = "s"\n[pipeline]\ndevice = "cuda"\n')
    assert main(["models", "list", "--config", str(cfg)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("device: NONE (pipeline.device = cuda but no usable GPU") and "exit 78" in first
