"""ReferenceIndex: build, search structures, metadata round trip and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monitor.errors import IndexError_
from monitor.index.ewc import EWCClassifier, EWCParams, ewc_search
from monitor.index.search import HNSWParams
from monitor.index.store import ReferenceIndex

ENC = [{"name": "a", "id": "a@1", "dim": 3, "version": "1.0"}, {"name": "b", "id": "b@2", "dim": 2}]


def _data(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = (rng.normal(size=(n, 5)) * 0.3 + 2.0 * np.eye(5)[labels] + 1.0).astype(np.float32)
    return x, labels


def _built(tmp_path: Path, metric: str = "l2") -> tuple[ReferenceIndex, Path]:
    x, y = _data()
    idx = ReferenceIndex.build(
        x, y, ("live", "apoptotic", "dead"), ENC, metric=metric, ewc=EWCParams(2, 16, 0.4, False), hnsw=HNSWParams(8, 20, 5),
        ref_names=[f"cell{i}" for i in range(len(y))], preprocessing={"crop_px": 64, "framing": "whole"},
    )
    return idx, idx.save(tmp_path / "index")


@pytest.mark.parametrize("metric", ["l2", "cosine", "canberra"])
def test_round_trip(tmp_path: Path, metric: str) -> None:
    idx, folder = _built(tmp_path, metric)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["metric"] == metric
    assert meta["classes"] == ["live", "apoptotic", "dead"] and meta["class_counts"] == {"live": 20, "apoptotic": 20, "dead": 20}
    assert meta["class_weights"] == [1.0, 1.0, 1.0]
    assert meta["ewc"] == {"k_min": 2, "k_max": 16, "entropy_threshold": 0.4, "reweight": False}
    assert meta["encoders"][0]["version"] == "1.0" and meta["preprocessing"]["crop_px"] == 64
    assert set(meta["checksums"]) == {"vectors.faiss", "labels.npy", "ids.json", "unknown_refs.npy"}
    back = ReferenceIndex.load(folder, [{"id": "a@1", "dim": 3}, {"id": "b@2", "dim": 2}])
    assert back.ewc == idx.ewc and back.hnsw == idx.hnsw and back.metric == metric and back.ref_names == idx.ref_names
    q = _data(9, seed=1)[0]
    d1, i1 = idx.search(q, 5)
    d2, i2 = back.search(q, 5)
    assert i1.tolist() == i2.tolist()
    np.testing.assert_allclose(d1, d2, rtol=1e-6)
    states = EWCClassifier(back).classify(q)
    assert states.predicted.tolist() == (np.arange(9) % 3).tolist()
    assert states.neighbor_ids.shape == (9, 16) and (states.k_used >= 2).all()


def test_cosine_distance_is_one_minus_cos() -> None:
    x = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=np.float32)
    idx = ReferenceIndex.build(x, np.array([0, 1]), ("a", "b"), ENC, metric="cosine")
    d, i = idx.search(np.array([[1, 1, 0, 0, 0]], dtype=np.float32), 2)
    assert d[0].tolist() == pytest.approx([1 - 2**-0.5] * 2)


def test_auto_structure_and_ef_search_never_below_k() -> None:
    x, y = _data(300)
    flat = ReferenceIndex.build(x, y, ("a", "b", "c"), ENC, hnsw_above=300)
    hnsw = ReferenceIndex.build(x, y, ("a", "b", "c"), ENC, hnsw_above=299, hnsw=HNSWParams(8, 40, 4), probe=None)
    assert (flat.structure, hnsw.structure) == ("flat", "hnsw")
    assert ReferenceIndex.build(x, y, ("a", "b", "c"), ENC, structure="hnsw").structure == "hnsw"
    assert ReferenceIndex.build(x, y, ("a", "b", "c"), ENC, metric="canberra", hnsw_above=10).structure == "flat"
    d, i = hnsw.search(x[:5], 100)
    assert (i >= 0).all() and i.shape == (5, 100)
    assert hnsw.faiss_index.hnsw.efSearch == 100


def _refusal(folder: Path, **kw: object) -> str:
    with pytest.raises(IndexError_) as e:
        ReferenceIndex.load(folder, **kw)  # type: ignore[arg-type]
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(folder))
    return msg


def test_refusals(tmp_path: Path) -> None:
    _, folder = _built(tmp_path)
    assert "no meta.json" in _refusal(tmp_path / "nowhere")
    msg = _refusal(folder, encoders=[{"id": "a@1", "dim": 4}, {"id": "b@2", "dim": 2}])
    assert "built with encoders a@1 (dim 3), b@2 (dim 2) but the configuration gives a@1 (dim 4), b@2 (dim 2)" in msg
    assert "b@3 (dim 2)" in _refusal(folder, encoders=[{"id": "a@1", "dim": 3}, {"id": "b@3", "dim": 2}])
    meta = json.loads((folder / "meta.json").read_text())

    def with_meta(**changes: object) -> None:
        (folder / "meta.json").write_text(json.dumps({**meta, **changes}))

    with_meta(format_version=99)
    assert "index format 99 is not supported" in _refusal(folder)
    with_meta(checksums={"labels.npy": meta["checksums"]["labels.npy"]})
    assert "no checksum for vectors.faiss" in _refusal(folder)
    with_meta(encoders=[{"name": "a", "id": "a@1", "dim": 4}])
    assert "dims sum to 4" in _refusal(folder)
    with_meta()
    labels = folder / "labels.npy"
    good = labels.read_bytes()
    labels.write_bytes(good[:-8] + b"\x01" * 8)
    assert "labels.npy does not match its checksum" in _refusal(folder)
    # a consistent but wrong label count: rewrite the file and its checksum
    np.save(labels, np.zeros(59, dtype=np.int64), allow_pickle=False)
    from monitor.hashing import file_sha256 as _sha256

    with_meta(checksums={**meta["checksums"], "labels.npy": _sha256(labels)})
    assert "59 labels for 60 vectors" in _refusal(folder)
    labels.write_bytes(good)
    with_meta()
    (folder / "ids.json").unlink()
    assert "ids.json (listed in meta.json) is missing" in _refusal(folder)
    (folder / "meta.json").write_text("{not json")
    assert "meta.json is unreadable" in _refusal(folder)


def test_build_rejects_inconsistent_inputs() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="labels for"):
        ReferenceIndex.build(x, y[:-1], ("a", "b", "c"), ENC)
    with pytest.raises(ValueError, match="dims sum to 3"):
        ReferenceIndex.build(x, y, ("a", "b", "c"), ENC[:1])


@pytest.mark.parametrize(("metric", "k"), [("l2", 100), ("cosine", 100), ("l2", 10)])
def test_gemm_search_equals_faiss_exact(metric: str, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocked torch GEMM path returns FAISS's exact neighbours (up to float ties)."""
    import faiss

    from monitor.index import search

    monkeypatch.setattr(search, "GEMM_K", 64)  # k = 100 takes the GEMM path (k = 10 FAISS's)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2500, 48)).astype(np.float32)
    x[11] = x[10]  # an exact tie: ordered by id
    q = rng.normal(size=(300, 48)).astype(np.float32)
    q[0] = x[10]
    idx = ReferenceIndex.build(x, np.arange(2500) % 4, tuple("abcd"), [{"name": "a", "id": "a", "dim": 48}], metric=metric)
    assert idx.searcher.uses_gemm
    idx.searcher._blocks = lambda n: [(s, min(n, s + 64)) for s in range(0, n, 64)]  # type: ignore[method-assign]
    d, i = idx.search(q, k)
    if metric == "cosine":
        xn, qn = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (x, q))
        f = faiss.IndexFlatIP(48)
        f.add(xn)
        fd, fi = f.search(qn, k)
        fd = 1.0 - fd
    else:
        f = faiss.IndexFlatL2(48)
        f.add(x)
        fd, fi = f.search(q, k)
    np.testing.assert_allclose(d, fd, rtol=1e-4, atol=1e-4)
    differ = i != fi
    # where the ids differ, the two distances are a float tie
    assert differ.mean() < 0.01
    np.testing.assert_allclose(d[differ], fd[differ], rtol=1e-5, atol=1e-5)
    assert i[0, :2].tolist() == [10, 11]
    assert (np.diff(d, axis=1) >= 0).all()


def test_blocked_ewc_equals_adaptive_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """EWCClassifier on the GEMM path (one distance matrix per block) = adaptive_search over search()."""
    from monitor import classify
    from monitor.index import search

    # search() above k = 64 through the same torch GEMM as ewc_search's later k, so that float
    # ties between FAISS's BLAS and torch's cannot reorder neighbour ids
    monkeypatch.setattr(search, "GEMM_K", 64)

    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, 3000)
    x = (rng.normal(size=(3000, 16)) + 0.8 * np.eye(16)[y]).astype(np.float32)
    q = rng.normal(size=(333, 16)).astype(np.float32)
    idx = ReferenceIndex.build(x, y, tuple("abcd"), [{"name": "a", "id": "a", "dim": 16}])
    idx.searcher._blocks = lambda n: [(s, min(n, s + 100)) for s in range(0, n, 100)]  # type: ignore[method-assign]
    p = EWCParams(5, 300, 0.6, True)
    got = ewc_search(idx, q, p)
    want = classify.adaptive_search(idx.search, q, idx.labels, 4, idx.weights, 5, 300, 0.6)
    assert len(set(got.k_used.tolist())) > 2  # the schedule really runs past k_min
    for f in ("predicted", "certainty", "k_used", "neighbor_ids", "neighbor_labels"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    # k <= 64 runs through FAISS, larger k through the GEMM: the same up to float rounding
    np.testing.assert_allclose(got.neighbor_distances, want.neighbor_distances, rtol=1e-5, atol=1e-4)
    st = EWCClassifier(idx, p).classify(q)
    assert st.predicted.tolist() == want.predicted.tolist()
