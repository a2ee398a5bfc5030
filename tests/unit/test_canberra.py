"""The fast exact Canberra path equals the numpy brute force (ids, order, distances)."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.index.canberra import (
    CanberraSearch,
    canberra_distances,
    canberra_knn,
    canberra_knn_reference,
)


def test_distance_definition() -> None:
    x = np.array([[1.0, -2.0, 0.0]], dtype=np.float32)
    y = np.array([[3.0, 2.0, 0.0], [1.0, -2.0, 0.0]], dtype=np.float32)
    d = canberra_distances(x, y)
    assert d[0].tolist() == pytest.approx([2 / 4 + 4 / 4 + 0.0, 0.0])


@pytest.mark.parametrize(("nq", "n", "dim", "k"), [(9, 300, 40, 5), (12, 1500, 700, 10), (4, 60, 3, 60), (6, 900, 600, 100)])
def test_fast_equals_brute_force(nq: int, n: int, dim: int, k: int) -> None:
    rng = np.random.default_rng(n)
    centres = rng.normal(size=(6, dim))
    r = (centres[rng.integers(0, 6, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
    r[:, : min(3, dim // 2)] = 0.0  # zero-denominator terms count 0
    r[7] = r[3]  # an exact tie: the lower id comes first
    q = (centres[rng.integers(0, 6, nq)] + 0.5 * rng.normal(size=(nq, dim))).astype(np.float32)
    q[0] = r[3]
    d_fast, i_fast = canberra_knn(q, r, k)
    d_ref, i_ref = canberra_knn_reference(q, r, k)
    assert i_fast.tolist() == i_ref.tolist()
    np.testing.assert_allclose(d_fast, d_ref, rtol=1e-12, atol=1e-12)
    assert i_fast[0, :2].tolist() == [3, 7]
    s = CanberraSearch(r)
    d_s, i_s = s.search(q, k)
    assert i_s.tolist() == i_ref.tolist()


@pytest.mark.parametrize(("batch", "query_block"), [(7, 16), (512, 2), (4, 3)])
def test_sparse_relu_like_features_batched(batch: int, query_block: int) -> None:
    """Pooled ReLU features: half the entries exactly 0 (terms 0 and 1); odd sizes, several batches."""
    rng = np.random.default_rng(batch)
    n, dim, nq = 1201, 777, 13
    centres = rng.normal(size=(5, dim))
    r = np.maximum(centres[rng.integers(0, 5, n)] + 0.7 * rng.normal(size=(n, dim)), 0).astype(np.float32)
    q = np.maximum(centres[rng.integers(0, 5, nq)] + 0.7 * rng.normal(size=(nq, dim)), 0).astype(np.float32)
    assert 0.3 < float(np.mean(r == 0)) < 0.7
    for k in (1, 10, 150):
        d_fast, i_fast = canberra_knn(q, r, k, batch=batch, query_block=query_block)
        d_ref, i_ref = canberra_knn_reference(q, r, k)
        assert i_fast.tolist() == i_ref.tolist()
        np.testing.assert_allclose(d_fast, d_ref, rtol=1e-12)


def test_k_larger_than_n_and_empty() -> None:
    r = np.arange(12, dtype=np.float32).reshape(4, 3)
    d, i = canberra_knn(r[:1], r, 10)
    assert i.shape == (1, 4) and i[0, 0] == 0
    d, i = canberra_knn(np.zeros((0, 3), np.float32), r, 2)
    assert i.shape == (0, 2)


def test_faiss_agrees() -> None:
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    r = np.abs(rng.normal(size=(500, 64))).astype(np.float32)
    q = np.abs(rng.normal(size=(5, 64))).astype(np.float32)
    idx = faiss.IndexFlat(64, faiss.METRIC_Canberra)
    idx.add(r)
    dist_f, ids_f = idx.search(q, 8)
    d, i = canberra_knn(q, r, 8)
    assert i.tolist() == ids_f.tolist()
    np.testing.assert_allclose(d, dist_f, rtol=1e-5)


@pytest.mark.parametrize("nonneg", [True, False])
def test_scan_values_within_eps(nonneg: bool) -> None:
    """The scan's float32 values (``vrcpps`` without a Newton step where AVX is there) stay within scan_eps of float64."""
    from monitor.index.canberra import CHUNK, _kernels, scan_eps

    rng = np.random.default_rng(11)
    dim = 1029  # not a multiple of 8: the scalar tail of each chunk runs too
    r = rng.normal(0.3, 1.0, size=(203, dim)).astype(np.float32)
    q = rng.normal(0.3, 1.0, size=(7, dim)).astype(np.float32)
    if nonneg:
        r, q = np.abs(r), np.abs(q)
    r[:, :5] = 0.0
    q[:, 3:9] = 0.0
    qa = np.abs(q) + np.float32(1e-30)
    seed = np.full(len(q), np.inf, dtype=np.float32)
    exact = canberra_distances(q, r)
    # heap as large as the references: nothing is abandoned, every value is a full sum
    _, _, _, approx = _kernels()["scan"](q, qa, r, nonneg, seed, len(r), 4, 16, CHUNK, 1.0)  # type: ignore[operator]
    assert float(np.max(np.abs(approx - exact) / exact)) <= scan_eps(dim)
    # small heap: abandoned pairs keep a partial sum, never above (1 + eps) x the distance
    _, _, _, approx = _kernels()["scan"](q, qa, r, nonneg, seed, 5, 4, 16, 256, 1.0)  # type: ignore[operator]
    assert bool(np.all(approx <= exact * (1 + scan_eps(dim, 256))))


@pytest.mark.parametrize("k", [1, 10, 64])
def test_no_pad_dense_ties_still_exact(k: int) -> None:
    """pad=0 and distances packed within the float32 error: the float32-close references get re-scored in float64."""
    rng = np.random.default_rng(k)
    n, dim = 2000, 1536
    r = np.abs(rng.normal(0.5, 1.0, size=(n, dim))).astype(np.float32)
    q = np.abs(rng.normal(0.5, 1.0, size=(5, dim))).astype(np.float32)
    d_fast, i_fast = canberra_knn(q, r, k, pad=0)
    d_ref, i_ref = canberra_knn_reference(q, r, k)
    assert i_fast.tolist() == i_ref.tolist()
    np.testing.assert_allclose(d_fast, d_ref, rtol=1e-12)


def test_portable_block_without_rcp() -> None:
    """The IEEE-division variant of the register block (used when AVX is missing) gives the same distances."""
    import numba as nb

    from monitor.index.canberra import _make_block

    blk = _make_block(4, 2, False, False)

    @nb.njit
    def run(q: np.ndarray, qa: np.ndarray, r: np.ndarray) -> np.ndarray:
        out = np.empty((4, 2), dtype=np.float32)
        v = blk(q, qa, r, (0, 1, 2, 3, 0, 1), 0, q.shape[1])
        for p in range(8):
            out[p // 2, p % 2] = v[p]
        return out

    rng = np.random.default_rng(5)
    q = rng.normal(size=(4, 64)).astype(np.float32)
    r = rng.normal(size=(2, 64)).astype(np.float32)
    q[0, :4] = 0.0
    r[:, :6] = 0.0
    got = run(q, np.abs(q) + np.float32(1e-30), r)
    np.testing.assert_allclose(got, canberra_distances(q, r), rtol=1e-5)


def test_huge_values_take_the_exact_path() -> None:
    """Values near the float32 limit (|x - y| could overflow in the scan) are answered by the float64 path."""
    rng = np.random.default_rng(2)
    r = rng.normal(size=(300, 40)).astype(np.float32)
    r[5, 0] = 3e38
    r[9, 1] = -3e38
    q = rng.normal(size=(3, 40)).astype(np.float32)
    q[1, 1] = 3e38
    d_fast, i_fast = canberra_knn(q, r, 7)
    d_ref, i_ref = canberra_knn_reference(q, r, 7)
    assert i_fast.tolist() == i_ref.tolist()
    np.testing.assert_allclose(d_fast, d_ref, rtol=1e-12)
