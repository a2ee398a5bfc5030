"""Embedding cache: the hit path calls no encoder; keys follow content, crops and encoder."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.index.cache import EmbeddingCache, embed_dataset
from monitor.index.dataset import Preprocess, scan, stratified_split
from monitor.protocols import EncoderBase


class CountingEncoder(EncoderBase):
    name = "count"
    dim = 4

    def __init__(self, id: str = "count@1") -> None:
        self.id = id
        self.crops = 0
        self.calls = 0

    def encode(self, crops: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.crops += len(crops)
        c = crops.astype(np.float32)
        return np.stack([c.mean(axis=(1, 2, 3)), c[..., 0].mean(axis=(1, 2)), c[..., 1].mean(axis=(1, 2)), c.std(axis=(1, 2, 3))], axis=1)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(5):
            cv2.imwrite(str(tmp_path / "d" / cls / f"{i}.png"), rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    return tmp_path / "d"


def test_hit_path_calls_no_encoder(tmp_path: Path, data: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    prep = Preprocess(crop_px=16)
    enc = CountingEncoder()
    first = embed_dataset(scan(data), [enc], prep, cache, batch_size=4, progress=False)
    assert enc.crops == 10 and len(first) == 10
    enc2 = CountingEncoder()
    cache2 = EmbeddingCache(tmp_path / "cache")
    second = embed_dataset(scan(data), [enc2], prep, cache2, batch_size=4, progress=False)
    assert enc2.calls == 0 and cache2.hits == 10 and cache2.misses == 0
    np.testing.assert_array_equal(first.vectors["count@1"], second.vectors["count@1"])
    assert second.names[0] == "a/0.png" and second.labels.tolist() == [0] * 5 + [1] * 5


def test_key_changes_with_content_crop_and_encoder(tmp_path: Path, data: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    enc = CountingEncoder()
    embed_dataset(scan(data), [enc], Preprocess(crop_px=16), cache, progress=False)
    embed_dataset(scan(data), [enc], Preprocess(crop_px=20), cache, progress=False)  # new crop size
    assert enc.crops == 20
    other = CountingEncoder("count@2")
    both = embed_dataset(scan(data), [enc, other], Preprocess(crop_px=16), cache, progress=False)  # new combination
    assert enc.crops == 20 and other.crops == 10
    assert both.concat(["count@1", "count@2"]).shape == (10, 8)
    cv2.imwrite(str(data / "a" / "0.png"), np.zeros((30, 30, 3), np.uint8))  # edited file
    embed_dataset(scan(data), [enc], Preprocess(crop_px=16), cache, progress=False)
    assert enc.crops == 21


def test_wrong_shape_entry_is_not_trusted(tmp_path: Path, data: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    enc = CountingEncoder()
    prep = Preprocess(crop_px=16)
    embed_dataset(scan(data), [enc], prep, cache, progress=False)
    p = next((tmp_path / "cache").rglob("*.npy"))
    np.save(p, np.zeros((1, 3), np.float32))
    embed_dataset(scan(data), [enc], prep, cache, progress=False)
    assert enc.crops == 11 and np.load(p).shape == (1, 4)


def test_stratified_split_is_reproducible() -> None:
    y = np.repeat(np.arange(3), [10, 20, 3])
    tr, te = stratified_split(y, 0.1, seed=1)
    tr2, te2 = stratified_split(y, 0.1, seed=1)
    assert te.tolist() == te2.tolist() and len(set(tr) & set(te)) == 0 and len(tr) + len(te) == 33
    assert np.bincount(y[te]).tolist() == [1, 2, 1]
