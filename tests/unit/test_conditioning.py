"""Feature conditioning in the index, query-side options (TTA), box framing, presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monitor.errors import IndexError_
from monitor.index.condition import Conditioner, ConditioningSpec
from monitor.index.store import ReferenceIndex
from monitor.protocols import EncoderBase


def _refs(n: int = 60, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes apart along dim 0, buried under one huge nuisance dimension (dim 1)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0, 1, (n, d)).astype(np.float32)
    x[:, 0] += 2.0 * y
    x[:, 1] *= 100.0
    return x, y


def _index(x: np.ndarray, y: np.ndarray, spec: ConditioningSpec | None) -> ReferenceIndex:
    return ReferenceIndex.build(x, y, ["a", "b"], [{"name": "e", "id": "e@1", "dim": x.shape[1]}], structure="flat", conditioning=spec)


def test_conditioning_fitted_on_references_only_and_whitens() -> None:
    x, y = _refs()
    idx = _index(x, y, ConditioningSpec(dim=6, shrinkage=0.0))
    c = idx.conditioner
    assert c is not None and c.in_dim == 12 and c.dim == 6 and c.n_fit == 60
    np.testing.assert_allclose(c.mean, x.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c.scale, x.std(axis=0), rtol=1e-4)
    # the references as stored: unit length, and before normalisation whitened (identity covariance)
    stored = idx.faiss_index.reconstruct_n(0, len(idx))
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, rtol=1e-5)
    w = ((x - c.mean) / c.scale) @ c.proj
    np.testing.assert_allclose(np.cov(w.T), np.eye(6), atol=1e-3)
    # classifying queries never refits it
    before = c.proj.copy()
    idx.search(np.random.default_rng(1).normal(0, 50, (7, 12)).astype(np.float32), 3)
    np.testing.assert_array_equal(c.proj, before)
    # the nuisance dimension no longer decides the neighbours: conditioned 5-NN beats raw 5-NN
    q, qy = _refs(40, seed=2)
    acc = {}
    for name, spec in (("raw", None), ("cond", ConditioningSpec(dim=12, shrinkage=0.0))):
        ids = _index(x, y, spec).search(q, 5)[1]
        acc[name] = float(((y[ids].mean(axis=1) > 0.5) == qy).mean())
    assert acc["cond"] > acc["raw"] + 0.1, acc


def test_conditioning_dim_capped_and_shrinkage_validated() -> None:
    x, y = _refs(n=8)
    assert Conditioner.fit(x, ConditioningSpec(dim=256)).dim == 7  # references - 1
    with pytest.raises(ValueError):
        ConditioningSpec(dim=16, shrinkage=1.5)
    with pytest.raises(ValueError, match="expects"):
        Conditioner.fit(x, ConditioningSpec(4)).apply(np.zeros((2, 5), np.float32))


def test_logistic_projection_finds_the_class_direction_under_a_huge_nuisance(tmp_path: Path) -> None:
    """The learned projection keeps the direction that separates the classes (dim 0), not the
    one with the most variance (dim 1), weighs a rare class as much as a common one, and is
    saved, checksummed and reloaded like the whitening."""
    rng = np.random.default_rng(1)
    n = 400
    y = (np.arange(n) % 10 == 0).astype(int)  # one in ten is "b", like dead cells in a calibration run
    x = rng.normal(0, 1, (n, 12)).astype(np.float32)
    x[:, 0] += 1.5 * y
    x[:, 1] *= 100.0
    c = Conditioner.fit(x, ConditioningSpec(1, method="logistic", penalty=1e-2), y)
    assert c.proj.shape == (12, 1) and c.record()["method"] == "standardise-logistic" and not c.l2
    z = c.apply(x)[:, 0]
    assert z.std() == pytest.approx(1.0, rel=1e-3)
    assert abs(c.proj[0, 0]) > 5 * np.abs(c.proj[1:, 0]).max()  # the class direction, not the nuisance
    assert z[y == 1].mean() > z[y == 0].mean() + 1.0  # the second class scores higher
    # most of each class on its own side of the midpoint
    mid = (z[y == 1].mean() + z[y == 0].mean()) / 2
    assert (z[y == 1] > mid).mean() > 0.6 and (z[y == 0] < mid).mean() > 0.6
    idx = ReferenceIndex.build(x, y, ["a", "b"], [{"name": "e", "id": "e@1", "dim": 12}], structure="flat",
                               conditioning=ConditioningSpec(1, method="logistic", penalty=1e-2))
    idx.save(tmp_path / "i")
    back = ReferenceIndex.load(tmp_path / "i")
    assert back.conditioner is not None and back.conditioner.method == "standardise-logistic"
    np.testing.assert_allclose(back.conditioner.apply(x), idx.conditioner.apply(x), atol=1e-6)
    # more classes: one centred logit per class
    y3 = np.arange(n) % 3
    x3 = rng.normal(0, 1, (n, 6)) + np.eye(6)[y3] * 2
    assert Conditioner.fit(x3, ConditioningSpec(1, method="logistic"), y3).proj.shape == (6, 3)
    with pytest.raises(ValueError, match="one class label per reference"):
        Conditioner.fit(x, ConditioningSpec(1, method="logistic"))
    with pytest.raises(ValueError, match="method must be one of"):
        ConditioningSpec(1, method="lda")


def test_conditioning_round_trip_with_checksums(tmp_path: Path) -> None:
    x, y = _refs()
    idx = _index(x, y, ConditioningSpec(dim=8, shrinkage=0.1))
    idx.save(tmp_path / "i")
    meta = json.loads((tmp_path / "i" / "meta.json").read_text())
    assert meta["conditioning"]["method"] == "standardise-pca-whiten-l2" and meta["conditioning"]["dim"] == 8
    assert meta["conditioning"]["in_dim"] == 12 and meta["conditioning"]["shrinkage"] == 0.1
    assert {"condition_mean.npy", "condition_scale.npy", "condition_proj.npy"} <= set(meta["checksums"])
    back = ReferenceIndex.load(tmp_path / "i", [{"id": "e@1", "dim": 12}])
    assert back.conditioner is not None and back.dim == 8 and back.meta.dim == 12
    np.testing.assert_array_equal(back.conditioner.proj, idx.conditioner.proj)
    q = _refs(10, seed=3)[0]
    d0, i0 = idx.search(q, 5)
    d1, i1 = back.search(q, 5)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1, rtol=1e-6)


@pytest.mark.parametrize("tamper", ["edit", "unlisted", "shape", "in_dim"])
def test_conditioning_tampered_is_refused(tmp_path: Path, tamper: str) -> None:
    from monitor.hashing import file_sha256

    x, y = _refs()
    folder = _index(x, y, ConditioningSpec(dim=8)).save(tmp_path / "i")
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    if tamper == "edit":  # an edited projection: its checksum no longer matches
        proj = np.load(folder / "condition_proj.npy")
        np.save(folder / "condition_proj.npy", proj * 1.01)
        match = "condition_proj.npy does not match its checksum"
    elif tamper == "unlisted":  # a projection whose checksum was dropped from meta.json
        del meta["checksums"]["condition_proj.npy"]
        match = "no checksum for condition_proj.npy"
    elif tamper == "shape":  # re-checksummed, but of another shape than meta.json says
        np.save(folder / "condition_proj.npy", np.zeros((12, 7), np.float32))
        meta["checksums"]["condition_proj.npy"] = file_sha256(folder / "condition_proj.npy")
        match = "meta.json says 12 -> 8"
    else:  # the conditioning claims another input dimension than the encoders give
        meta["conditioning"]["in_dim"] = 13
        match = "conditioning"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IndexError_, match=match):
        ReferenceIndex.load(folder)


def test_queries_conditioned_identically_by_service_classifier_and_evaluate() -> None:
    """EWCClassifier (the service and classify) and evaluate (EWC and plain k-NN) get raw vectors
    and see the same conditioned neighbours as a search on hand-conditioned vectors."""
    from monitor.index.evaluate import evaluate, plain_knn
    from monitor.index.ewc import EWCClassifier, EWCParams

    x, y = _refs(80)
    q, qy = _refs(30, seed=4)
    idx = _index(x, y, ConditioningSpec(dim=6))
    c = idx.conditioner
    by_hand = ReferenceIndex.build(c.apply(x), y, ["a", "b"], [{"name": "e", "id": "e@1", "dim": 6}], structure="flat")
    p = EWCParams(3, 40, 0.5, True)
    s_service = EWCClassifier(idx, p).classify(q)
    s_hand = EWCClassifier(by_hand, p).classify(c.apply(q))
    np.testing.assert_array_equal(s_service.predicted, s_hand.predicted)
    np.testing.assert_array_equal(s_service.k_used, s_hand.k_used)
    ev = evaluate(idx, q, [["a", "b"][i] for i in qy], p, 5)
    np.testing.assert_array_equal(ev.ewc.confusion.sum(axis=0), np.bincount(s_service.predicted, minlength=2))
    np.testing.assert_array_equal(plain_knn(idx, q, 5), plain_knn(by_hand, c.apply(q), 5))


# ---------------------------------------------------------------- query-side TTA


class _Enc(EncoderBase):
    """Position-sensitive fake encoder: the first row and first column of each crop."""

    name = "fake"
    id = "fake@1"
    dim = 2 * 6

    def __init__(self) -> None:
        self.seen = 0

    def encode(self, crops: np.ndarray) -> np.ndarray:
        self.seen += len(crops)
        c = np.asarray(crops, dtype=np.float32)[..., 0]
        return np.concatenate([c[:, 0, :], c[:, :, 0]], axis=1)


def test_tta_is_orientation_invariant_and_keeps_the_encoder_id() -> None:
    from monitor.index.query import TTAEncoder, dihedral8

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (3, 6, 6, 3), dtype=np.uint8)
    views = dihedral8(crops)
    assert views.shape == (24, 6, 6, 3)
    assert len({v.tobytes() for v in views[::3]}) == 8  # 8 distinct orientations of crop 0
    base = _Enc()
    tta = TTAEncoder(base, batch_size=5)
    assert (tta.name, tta.id, tta.dim) == (base.name, base.id, base.dim) and tta.cache_id == "fake@1+tta8"
    v = tta.encode(crops)
    assert base.seen == 24 and v.shape == (3, 12)
    np.testing.assert_allclose(v, base.encode(views).reshape(8, 3, -1).mean(axis=0), rtol=1e-6)
    turned = np.rot90(crops, 1, axes=(1, 2))[:, :, ::-1]  # any orientation of the input: the same vector
    np.testing.assert_allclose(tta.encode(turned), v, rtol=1e-5)
    assert not np.allclose(base.encode(turned), base.encode(crops))  # the encoder alone is not invariant


def test_query_side_follows_the_index(tmp_path: Path) -> None:
    from monitor.index.query import TTAEncoder, query_encoders, query_pipeline

    x, y = _refs(20)
    enc = [{"name": "e", "id": "e@1", "dim": 12}]
    plain = ReferenceIndex.build(x, y, ["a", "b"], enc, preprocessing={"layout": "folders", "framing": "whole"})
    boxed = ReferenceIndex.build(
        x, y, ["a", "b"], enc, query={"tta": 8}, preprocessing={"layout": "voc", "box_framing": "box", "box_margin": 0.3}
    )
    boxed.save(tmp_path / "b")
    boxed = ReferenceIndex.load(tmp_path / "b")
    assert boxed.meta.tta == 8 and plain.meta.tta == 1
    assert isinstance(query_encoders([_Enc()], boxed.meta)[0], TTAEncoder)
    assert not isinstance(query_encoders([_Enc()], plain.meta)[0], TTAEncoder)

    from monitor.pipeline import Pipeline

    p = Pipeline(segmenter=None, encoders=[_Enc()], classifier=None)  # type: ignore[arg-type]
    q = query_pipeline(p, boxed)
    assert q.crop_framing == "box" and q.crop_margin == 0.3 and isinstance(q.encoders[0], TTAEncoder)
    q = query_pipeline(p, plain)
    assert q.crop_framing == "window" and not isinstance(q.encoders[0], TTAEncoder)
    with pytest.raises(ValueError, match="tta"):
        ReferenceIndex.build(x, y, ["a", "b"], enc, query={"tta": 3})


# ---------------------------------------------------------------- box framing


def test_box_framing_crops_the_box_with_its_margin() -> None:
    from monitor.imaging import crop_boxes, crop_cells
    from monitor.records import Frame, FrameKey
    from monitor.segmentation import cells_from_labels

    img = np.full((100, 120, 3), 50, np.uint8)
    img[20:40, 30:50] = 250  # a 20 x 20 px cell
    img[60:70, 80:90] = 250  # a 10 x 10 px cell
    crops = crop_boxes(img, np.array([[20, 30, 40, 50], [60, 80, 70, 90]]), 56, margin=0.2)
    for c in crops:
        # window = 1.4 x the box: the cell fills the central 1/1.4 of every crop, whatever its size
        bright = np.argwhere(c[..., 0] > 150)
        assert bright.min(axis=0).tolist() == pytest.approx([8, 8], abs=1)
        assert bright.max(axis=0).tolist() == pytest.approx([47, 47], abs=1)
    # segmented cells framed by their bounding box the same way
    lab = np.zeros((100, 120), np.int32)
    lab[20:40, 30:50], lab[60:70, 80:90] = 1, 2
    frame = Frame(FrameKey("e", "A1", "1", 0), {"i": img}, "i", None, 1.0, "config", "t")
    via_cells = crop_cells(frame, cells_from_labels(lab, 1.0), 56, framing="box", margin=0.2)
    np.testing.assert_array_equal(via_cells, crops)


def test_voc_boxes_framed_by_their_box_by_default() -> None:
    from monitor.index.dataset import Preprocess, crops_for

    img = np.full((220, 220), 80, np.uint8)
    img[100:112, 50:62] = 240  # a 12 px cell in a 220 px frame
    default = crops_for(img, Preprocess(crop_px=64), ((50.0, 100.0, 62.0, 112.0),))[0]
    frac = (default[..., 0] > 160).mean()
    assert 0.4 < frac < 0.6  # (1 / 1.4)^2 = 0.51 of the crop is the cell
    window = crops_for(img, Preprocess(crop_px=64, box_framing="window"), ((50.0, 100.0, 62.0, 112.0),))[0]
    assert (window[..., 0] > 160).mean() < 0.2  # a fixed window at the frame's scale: mostly background


# ---------------------------------------------------------------- encoders and presets


def test_efficientnet_multi_layer_is_part_of_the_id() -> None:
    from cellmonitor_plugins.encoders.efficientnet import load_efficientnet_lite

    last = load_efficientnet_lite(0, None, input_px=64, random_init=True)
    multi = load_efficientnet_lite(0, None, input_px=64, random_init=True, layers="multi")
    multi.model.load_state_dict(last.model.state_dict())
    assert last.id.endswith(":avgpool") and multi.id.endswith(":avgpool+s3s5s7") and last.id != multi.id
    assert (last.dim, multi.dim) == (1280, 1280 + 40 + 112 + 320)
    crops = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    a, b = last.encode(crops), multi.encode(crops)
    assert b.shape == (2, 1752)
    np.testing.assert_allclose(b[:, :1280], a, rtol=1e-4, atol=1e-5)  # the head part is the last-layer vector
    assert np.abs(b[:, 1280:]).sum() > 0


def test_encoder_specs_and_presets() -> None:
    import tomllib

    from monitor.config import parse_config
    from monitor.index import presets as P

    parse_encoder, encoder_spec, encoders_toml = P.parse_encoder, P.encoder_spec, P.encoders_toml
    assert parse_encoder("efficientnet-lite0:layers=multi:input_px=192") == ("efficientnet-lite0", {"layers": "multi", "input_px": 192})
    assert parse_encoder("mymod:ENC") == ("mymod:ENC", {})
    assert parse_encoder("mymod:ENC:threads=2") == ("mymod:ENC", {"threads": 2})
    assert encoder_spec("efficientnet-lite0", {"layers": "multi"}) == "efficientnet-lite0:layers=multi"
    with pytest.raises(ValueError):
        parse_encoder("efficientnet-lite0:layers=multi:oops")
    assert P.DEFAULT_PRESET in P.PRESETS and {"accurate", "fast"} <= set(P.PRESETS)
    for p in P.PRESETS.values():
        cfg = tomllib.loads(encoders_toml(list(p.encoders)))
        parse_config(cfg)  # a valid service config fragment
        assert [(e["name"], e.get("options", {})) for e in cfg["encoders"]] == [(n, dict(o)) for n, o in p.encoders]


@pytest.mark.parametrize("name", ["accurate", "balanced", "fast", "zoo"])
def test_shipped_preset_configs_match_the_presets(name: str) -> None:
    import tomllib

    from monitor.config import parse_config
    from monitor.index.presets import PRESETS

    path = Path(__file__).resolve().parents[2] / "config" / "presets" / f"{name}.toml"
    cfg = tomllib.loads(path.read_text())
    parse_config(cfg)
    assert [(e["name"], e.get("options", {})) for e in cfg["encoders"]] == [(n, dict(o)) for n, o in PRESETS[name].encoders]


def test_config_default_encoders_are_the_default_preset_s():
    """A config that names no encoders takes an index built with no --preset (the defaults agree)."""
    from monitor.config import Config
    from monitor.index import presets as P

    want = [(n, dict(o)) for n, o in P.PRESETS[P.DEFAULT_PRESET].encoders]
    assert [(r.name, dict(r.options)) for r in Config().encoders] == want


def test_efficientnet_pooling_and_all_stages_are_part_of_the_id() -> None:
    import torch
    from cellmonitor_plugins.encoders.efficientnet import load_efficientnet_lite

    mean = load_efficientnet_lite(0, None, input_px=64, random_init=True, layers="all")
    gem = load_efficientnet_lite(0, None, input_px=64, random_init=True, layers="all", pool="gem")
    both = load_efficientnet_lite(0, None, input_px=64, random_init=True, layers="all", pool="meanmax")
    gem.model.load_state_dict(mean.model.state_dict())
    both.model.load_state_dict(mean.model.state_dict())
    assert mean.id.endswith(":avgpool+s1s2s3s4s5s6s7") and gem.id.endswith(":gem3pool+s1s2s3s4s5s6s7")
    assert both.id.endswith(":avgmaxpool+s1s2s3s4s5s6s7")
    assert (mean.dim, gem.dim, both.dim) == (2064, 2064, 4128)
    crops = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    a, g, b = mean.encode(crops), gem.encode(crops), both.encode(crops)
    assert a.shape == g.shape == (2, 2064) and b.shape == (2, 4128)
    np.testing.assert_allclose(b[:, :2064], a, rtol=1e-4, atol=1e-5)  # the average pools first
    assert (b[:, 2064:] >= b[:, :2064] - 1e-5).all() and (b[:, 2064:] > b[:, :2064] + 1e-3).any()  # then the max pools
    # the head part of the GeM vector is the cube-root mean cube of the (positive part of the) head map
    m = mean.model
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.inference_mode():
        head = m.extract_features(x)
    expect = head.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3).numpy()
    np.testing.assert_allclose(g[:, :1280], expect, rtol=1e-4, atol=1e-5)
    assert not np.allclose(g, a, rtol=0.1, atol=0)


def test_class_folder_framing_follows_the_preset_unless_given(tmp_path: Path) -> None:
    """``index build`` frames class-folder images as its preset says (the default: a centre crop,
    the service's framing), ``--framing`` overrides it; the choice is what the index records."""
    from monitor.cli import index as cli_index
    from monitor.cli.main import build_parser
    from monitor.index.presets import DEFAULT_PRESET, PRESETS

    ap = build_parser()
    prep = cli_index._prep(ap.parse_args(["index", "build", str(tmp_path), "--out", str(tmp_path / "i")]))
    assert PRESETS[DEFAULT_PRESET].framing == "center" and prep.framing == "center"
    assert cli_index._prep(ap.parse_args(["index", "build", str(tmp_path), "--out", "i", "--preset", "raw"])).framing == "whole"
    assert cli_index._prep(ap.parse_args(["index", "build", str(tmp_path), "--out", "i", "--framing", "whole"])).framing == "whole"
    assert cli_index._prep(ap.parse_args(["index", "search", str(tmp_path), "--encoders", "x"])).framing == PRESETS[DEFAULT_PRESET].framing
    # centre framing: a crop_px window of the image at its own scale (no resampling), not the whole image shrunk
    from monitor.index.dataset import crops_for

    img = np.zeros((360, 360, 3), np.uint8)
    img[100:260, 100:260] = 200  # a 160 px "cell" in the middle
    centre = crops_for(img, prep)[0]
    whole = crops_for(img, cli_index._prep(ap.parse_args(["index", "build", str(tmp_path), "--out", "i", "--framing", "whole"])))[0]
    assert centre.shape == whole.shape == (224, 224, 3)
    assert abs((centre[..., 0] > 100).mean() - (160 / 224) ** 2) < 0.02
    assert abs((whole[..., 0] > 100).mean() - (160 / 360) ** 2) < 0.02
