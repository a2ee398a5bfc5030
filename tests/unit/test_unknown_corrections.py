"""Unknown cells (calibrated at build, stored in the index) and expert corrections added live."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitor.errors import IndexError_
from monitor.index.condition import ConditioningSpec
from monitor.index.ewc import EWCClassifier, EWCParams
from monitor.index.store import CORRECTIONS, ReferenceIndex

ENC = [{"name": "fake", "id": "fake:v1", "dim": 16}]
CLASSES = ("live", "apoptotic", "dead")


def _blobs(rng: np.random.Generator, centres: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(len(centres)), n)
    return (centres[y] + rng.normal(0, 1.0, (len(y), centres.shape[1]))).astype(np.float32), y


@pytest.fixture(scope="module")
def world() -> dict:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6.0, (4, 16))  # the 4th class is never a reference
    x_ref, y_ref = _blobs(rng, centres[:3], 150)
    x_held, y_held = _blobs(rng, centres[:3], 100)
    x_new, _ = _blobs(rng, centres[3:], 100)
    return {"x_ref": x_ref, "y_ref": y_ref, "x_held": x_held, "y_held": y_held, "x_new": x_new, "centres": centres}


@pytest.mark.parametrize("conditioning", [None, ConditioningSpec(dim=8)])
def test_absent_class_is_unknown_and_held_out_references_are_not(world: dict, conditioning: ConditioningSpec | None) -> None:
    idx = ReferenceIndex.build(world["x_ref"], world["y_ref"], CLASSES, ENC, conditioning=conditioning)
    assert idx.meta.unknown is not None and idx.meta.unknown["quantile"] == 0.99 and idx.meta.unknown["space"] == "raw"
    clf = EWCClassifier(idx, EWCParams(k_min=5, k_max=40))
    held = clf.classify(world["x_held"])
    assert held.unknown is not None
    false_unknown = float(held.unknown.mean())
    assert false_unknown < 0.05, false_unknown
    new = clf.classify(world["x_new"])
    assert new.unknown is not None and new.unknown.mean() > 0.9
    # still labelled with a state beside the flag
    assert len(new.predicted) == len(world["x_new"])


def test_unknown_is_stored_and_counted(tmp_path, world: dict) -> None:
    from monitor.pipeline import count_states
    from monitor.records import Frame, FrameKey
    from monitor.service.rows import counts_row

    idx = ReferenceIndex.build(world["x_ref"], world["y_ref"], CLASSES, ENC)
    idx.save(tmp_path / "i")
    back = ReferenceIndex.load(tmp_path / "i")
    assert back.unknown_distance == pytest.approx(idx.unknown_distance)
    states = EWCClassifier(back).classify(np.concatenate([world["x_held"][:10], world["x_new"][:5]]))
    frame = Frame(FrameKey("e", "A1", "1", 0), {"p": np.zeros((4, 4))}, "p", None, 0.5, "config", "x")
    c = count_states(frame, states, None, {})
    assert c.n_unknown == int(states.unknown.sum()) >= 5
    row = counts_row(c)
    assert row["n_unknown"] == c.n_unknown and row["index_version"] == 1
    # the flag can be switched off (config classifier.unknown = false)
    assert EWCClassifier(back, flag_unknown=False).classify(world["x_new"][:3]).unknown is None


def test_corrections_change_predictions_persist_and_bump_the_version(tmp_path, world: dict) -> None:
    idx = ReferenceIndex.build(world["x_ref"], world["y_ref"], CLASSES, ENC, conditioning=ConditioningSpec(dim=8))
    idx.save(tmp_path / "i")
    clf = EWCClassifier(idx, EWCParams(k_min=5, k_max=40))
    # cells of the unseen 4th kind: an expert says they are 'dead'
    before = clf.classify(world["x_new"][50:])
    assert (before.predicted == 2).mean() < 0.9 or before.unknown.mean() > 0.9
    v = idx.add(world["x_new"][:50], np.full(50, 2), [f"expert-{i}" for i in range(50)])
    assert v == 2 and idx.version == 2 and len(idx) == 500
    after = clf.classify(world["x_new"][50:])
    assert after.index_version == 2
    assert (after.predicted == 2).mean() > 0.9
    idx.save_corrections(tmp_path / "i")
    back = ReferenceIndex.load(tmp_path / "i")
    assert back.version == 2 and len(back) == 500 and back.n_corrections == 50
    again = EWCClassifier(back, EWCParams(k_min=5, k_max=40)).classify(world["x_new"][50:])
    assert np.array_equal(again.predicted, after.predicted)
    # a second batch: one file set per version, the old one removed
    back.add(world["x_new"][:2], np.array([0, 0]))
    back.save_corrections(tmp_path / "i")
    files = sorted(p.name for p in (tmp_path / "i" / "corrections").iterdir())
    assert files and all(f.startswith("v00003.") for f in files)
    assert ReferenceIndex.load(tmp_path / "i").version == 3


def test_edited_corrections_are_refused_in_one_line(tmp_path, world: dict) -> None:
    idx = ReferenceIndex.build(world["x_ref"], world["y_ref"], CLASSES, ENC)
    idx.save(tmp_path / "i")
    idx.add(world["x_new"][:3], np.array([1, 1, 1]))
    idx.save_corrections(tmp_path / "i")
    rec = json.loads((tmp_path / "i" / CORRECTIONS).read_text())
    victim = tmp_path / "i" / next(r for r in rec["files"] if r.endswith("labels.npy"))
    np.save(victim, np.array([0, 0, 0]), allow_pickle=False)
    with pytest.raises(IndexError_, match="checksum"):
        ReferenceIndex.load(tmp_path / "i")


def test_add_refuses_bad_corrections(world: dict) -> None:
    idx = ReferenceIndex.build(world["x_ref"], world["y_ref"], CLASSES, ENC)
    with pytest.raises(ValueError, match="raw encoder vectors"):
        idx.add(np.zeros((2, 5), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        idx.add(np.zeros((1, 16), np.float32), np.array([7]))
    assert idx.version == 1 and len(idx) == 450


def test_a_full_save_folds_the_corrections_in_once(tmp_path, world: dict) -> None:
    idx = ReferenceIndex.build(world["x_ref"], world["y_ref"], CLASSES, ENC)
    idx.save(tmp_path / "i")
    idx.add(world["x_new"][:4], np.array([2, 2, 2, 2]))
    idx.save_corrections(tmp_path / "i")
    idx.save(tmp_path / "i")  # everything into the main files
    back = ReferenceIndex.load(tmp_path / "i")
    assert len(back) == 454 and back.version == 2 and back.n_corrections == 0
    assert back.unknown is not None and len(back.unknown.refs) == 454
