"""HNSW efSearch picked at build time by a recall probe on held-out references, persisted in meta.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from monitor.index.ewc import EWCParams
from monitor.index.search import HNSWParams, ProbeSpec
from monitor.index.store import ReferenceIndex

D = 32
ENC = [{"name": "s", "id": "s@1", "dim": D}]
K = 20  # EWC's k_max: the k the probe measures recall at
CLASSES = ("a", "b", "c")


def _uniform(n: int, seed: int) -> np.ndarray:
    # uniform in 32 dims: a hard set for a thin graph (no clusters to route through)
    return np.random.default_rng(seed).random((n, D), dtype=np.float32)


def _build(x: np.ndarray, hnsw: HNSWParams, probe: ProbeSpec | None, metric: str = "l2") -> ReferenceIndex:
    return ReferenceIndex.build(x, np.arange(len(x)) % 3, CLASSES, ENC, metric=metric, structure="hnsw", hnsw=hnsw,  # type: ignore[arg-type]
                                ewc=EWCParams(5, K, 0.5, True), probe=probe, unknown_quantile=None)


def _recall(idx: ReferenceIndex, refs: np.ndarray, q: np.ndarray, k: int, metric: str = "l2") -> float:
    """recall@k of the index's own search on fresh queries against a numpy brute force."""
    if metric == "cosine":
        rn = refs / np.linalg.norm(refs, axis=1, keepdims=True)
        d = -(q / np.linalg.norm(q, axis=1, keepdims=True)) @ rn.T
    else:
        d = (q * q).sum(1)[:, None] - 2 * q @ refs.T + (refs * refs).sum(1)[None, :]
    exact = np.argsort(d, axis=1)[:, :k]
    _, ids = idx.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), exact.tolist(), strict=True)]))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_probe_picks_an_ef_search_that_meets_the_target(metric: str) -> None:
    x, q = _uniform(3000, 0), _uniform(400, 1)
    # efSearch 20 (= k) as given: what the index would search with if the probe were skipped
    idx = _build(x, HNSWParams(8, 20, K), ProbeSpec(recall_target=0.9, queries=300), metric)
    p = idx.meta.search_probe
    assert p is not None and p.met and p.k == K and p.queries == 300 and p.target == 0.9
    assert p.recall >= 0.9 and p.tried[-1] == (p.ef_search, pytest.approx(p.recall, abs=1e-4))
    assert all(r < 0.9 for _, r in p.tried[:-1])  # the smallest rung that met it
    assert p.ef_search > K  # this graph needs more than efSearch = k ...
    assert idx.hnsw.ef_search == p.ef_search
    # ... and what the index searches with now reaches the target on queries the probe never saw
    assert _recall(idx, x, q, K, metric) >= 0.86
    assert idx.faiss_index.hnsw.efSearch == p.ef_search
    unprobed = _build(x, HNSWParams(8, 20, K), None, metric)
    assert unprobed.meta.search_probe is None and _recall(unprobed, x, q, K, metric) < 0.8


def test_held_out_references_are_added_back_in_order() -> None:
    x = _uniform(2000, 2)
    idx = _build(x, HNSWParams(8, 20, K), ProbeSpec(queries=200))
    assert idx.meta.search_probe is not None and len(idx) == 2000
    # id i is row i again (the held-out rows went into the graph last, then it was renumbered)
    np.testing.assert_array_equal(idx.faiss_index.reconstruct_n(0, len(x)), x)
    _, ids = idx.search(x[:200], 1)
    assert np.mean(ids[:, 0] == np.arange(200)) >= 0.99


def test_chosen_ef_search_is_persisted_and_reloaded(tmp_path: Path) -> None:
    x = _uniform(2000, 3)
    idx = _build(x, HNSWParams(8, 20, K), ProbeSpec(recall_target=0.9, queries=200))
    p = idx.meta.search_probe
    assert p is not None
    folder = idx.save(tmp_path / "index")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["hnsw"]["ef_search"] == p.ef_search
    rec = meta["search_probe"]
    assert (rec["k"], rec["ef_search"], rec["recall"], rec["queries"], rec["met"]) == (K, p.ef_search, p.recall, 200, True)
    back = ReferenceIndex.load(folder)
    assert back.meta.search_probe == p and back.hnsw.ef_search == p.ef_search
    back.search(x[:3], 5)
    assert back.faiss_index.hnsw.efSearch == p.ef_search  # used at query time (k below it)
    back.search(x[:3], p.ef_search + 7)
    assert back.faiss_index.hnsw.efSearch == p.ef_search + 7  # never below k
    # an index written before the probe existed: no search_probe, its own efSearch
    del meta["search_probe"]
    meta["hnsw"]["ef_search"] = 64
    (folder / "meta.json").write_text(json.dumps(meta))
    old = ReferenceIndex.load(folder)
    assert old.meta.search_probe is None and old.hnsw.ef_search == 64


def test_no_rung_reaches_the_target_warns_and_keeps_the_best(caplog: pytest.LogCaptureFixture) -> None:
    x = _uniform(2000, 4)
    with caplog.at_level(logging.INFO, logger="monitor.index.search"):
        idx = _build(x, HNSWParams(4, 8, K), ProbeSpec(recall_target=1.0, queries=200, ladder=(1.0, 2.0)))
    p = idx.meta.search_probe
    assert p is not None and not p.met and [e for e, _ in p.tried] == [K, 2 * K]
    assert p.ef_search == max(p.tried, key=lambda t: t[1])[0] and idx.hnsw.ef_search == p.ef_search
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "no rung reached recall@20 1.00" in warned[0].getMessage()


def test_flat_indexes_and_tiny_sets_are_not_probed() -> None:
    x = _uniform(300, 5)
    flat = ReferenceIndex.build(x, np.arange(300) % 3, CLASSES, ENC, ewc=EWCParams(5, K, 0.5, True), unknown_quantile=None)
    assert flat.structure == "flat" and flat.meta.search_probe is None
    tiny = _build(x[:9], HNSWParams(8, 20, 7), ProbeSpec())  # a tenth of 9 references: nothing to hold out
    assert tiny.meta.search_probe is None and tiny.hnsw.ef_search == 7
    with pytest.raises(ValueError, match="recall target"):
        ProbeSpec(recall_target=1.5)
