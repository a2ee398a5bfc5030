"""Exact k-NN under the Canberra distance ``sum_d |x_d - y_d| / (|x_d| + |y_d|)``.

Terms with ``|x_d| + |y_d| == 0`` count 0 (as FAISS does). Ties are broken by
the lower reference id.

Two implementations, one answer:

* :func:`canberra_distances` / :func:`canberra_knn_reference` -- plain blocked
  numpy in float64: the definition, and what the tests compare against.
* :func:`canberra_knn` -- the fast path (numba, parallel over query blocks):

  1. *seed*: an approximate pass over a sample of dimensions picks, per
     query, the ``k`` most promising references; their exact distances give
     a first upper bound on the k-th neighbour distance;
  2. *scan*: a fused, cache-blocked kernel walks reference blocks x query
     blocks, accumulating float32 terms chunk by chunk, and abandons a
     reference as soon as its partial sum exceeds the query's current bound
     (all terms are >= 0, so abandoning is exact); survivors enter a bounded
     max-heap of ``k + pad`` candidates;
  3. *certify*: the candidates are re-scored in float64 (same formula as the
     reference) and sorted by (distance, id). If the float64 k-th distance
     is not safely below the smallest float32 value that was excluded
     (float32 rounding could then reorder neighbours), that query is redone
     with the reference implementation. So the result always equals the
     float64 brute force, ties included.

Policy: inputs with NaN are rejected (ValueError); numba missing falls back to
the numpy reference with a warning.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

CHUNK = 256  # dims per early-abandon check
SLACK = 1e-4  # relative float32 error allowance (bound is ~1e-5 with chunked sums)


def canberra_distances(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """(Q, N) exact Canberra distances in float64, blocked to bound memory."""
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(refs, dtype=np.float64)
    out = np.empty((q.shape[0], r.shape[0]), dtype=np.float64)
    ra = np.abs(r)
    block = max(1, int(2**24 // max(1, r.shape[1] * 8)))
    for i, x in enumerate(q):
        xa = np.abs(x)
        for s in range(0, r.shape[0], block):
            num = np.abs(r[s : s + block] - x)
            den = ra[s : s + block] + xa
            out[i, s : s + block] = np.divide(num, den, out=np.zeros_like(num), where=den > 0).sum(axis=1)
    return out


def canberra_knn_reference(queries: np.ndarray, refs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: (distances float64, ids int64) of the k nearest, ties to the lower id."""
    d = canberra_distances(queries, refs)
    k = min(k, d.shape[1])
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx.astype(np.int64)


_KERNELS: dict[str, object] = {}


def _kernels() -> dict[str, object]:
    if _KERNELS:
        return _KERNELS
    import numba as nb

    @nb.njit(fastmath=True)
    def _chunk(x: np.ndarray, y: np.ndarray, s: int, e: int) -> float:
        acc = np.float32(0.0)
        for d in range(s, e):
            a = x[d]
            b = y[d]
            den = abs(a) + abs(b)
            # den == 0 implies a == b == 0: the term is 0. The floor must be a
            # normal float32 (fastmath divides via rcpps, which flushes
            # denormals to 0 -> inf -> NaN); for den < 1e-30 the float32 term
            # can only underestimate, which never wrongly abandons a neighbour.
            acc += abs(a - b) / max(den, np.float32(1e-30))
        return acc

    @nb.njit(inline="always")
    def _heap_push(hd: np.ndarray, hi: np.ndarray, n: int, cap: int, dist: float, idx: int) -> int:
        # max-heap on (dist, idx); returns new size
        if n < cap:
            j = n
            n += 1
        else:
            if dist > hd[0] or (dist == hd[0] and idx > hi[0]):
                return n
            # replace root and sift down
            j = 0
            while True:
                lft = 2 * j + 1
                if lft >= n:
                    break
                c = lft
                r = lft + 1
                if r < n and (hd[r] > hd[lft] or (hd[r] == hd[lft] and hi[r] > hi[lft])):
                    c = r
                if hd[c] > dist or (hd[c] == dist and hi[c] > idx):
                    hd[j] = hd[c]
                    hi[j] = hi[c]
                    j = c
                else:
                    break
            hd[j] = dist
            hi[j] = idx
            return n
        while j > 0:
            p = (j - 1) // 2
            if hd[p] < dist or (hd[p] == dist and hi[p] < idx):
                hd[j] = hd[p]
                hi[j] = hi[p]
                j = p
            else:
                break
        hd[j] = dist
        hi[j] = idx
        return n

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def scan(q: np.ndarray, r: np.ndarray, seed_bound: np.ndarray, cap: int, qb: int, rb: int, chunk: int, slack: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        nq, dim = q.shape
        nr = r.shape[0]
        hd = np.full((nq, cap), np.inf, dtype=np.float32)
        hi = np.full((nq, cap), -1, dtype=np.int64)
        excl = np.full(nq, np.inf, dtype=np.float32)  # smallest float32 partial/total left out
        sizes = np.zeros(nq, dtype=np.int64)
        nqb = (nq + qb - 1) // qb
        for b in nb.prange(nqb):
            q0 = b * qb
            q1 = min(nq, q0 + qb)
            bound = np.empty(q1 - q0, dtype=np.float32)
            for t in range(q1 - q0):
                bound[t] = seed_bound[q0 + t] * (1.0 + 8.0 * slack)
            for r0 in range(0, nr, rb):
                r1 = min(nr, r0 + rb)
                for t in range(q1 - q0):
                    qi = q0 + t
                    x = q[qi]
                    for j in range(r0, r1):
                        y = r[j]
                        acc = np.float32(0.0)
                        s = 0
                        lim = bound[t]
                        abandoned = False
                        while s < dim:
                            e = min(dim, s + chunk)
                            acc += _chunk(x, y, s, e)
                            s = e
                            if acc > lim:
                                abandoned = True
                                break
                        if abandoned:
                            if acc < excl[qi]:
                                excl[qi] = acc
                            continue
                        n = sizes[qi]
                        if n == cap:
                            # the root leaves the heap (or acc does): remember the smaller
                            out = acc if (acc > hd[qi, 0] or (acc == hd[qi, 0] and j > hi[qi, 0])) else hd[qi, 0]
                            if out < excl[qi]:
                                excl[qi] = out
                        sizes[qi] = _heap_push(hd[qi], hi[qi], n, cap, acc, j)
                        if sizes[qi] == cap:
                            nb_ = hd[qi, 0] * (1.0 + 8.0 * slack)
                            if nb_ < bound[t]:
                                bound[t] = nb_
        return hd, hi, sizes, excl

    @nb.njit(parallel=True, cache=True)
    def exact_pairs(q: np.ndarray, r: np.ndarray, ids: np.ndarray) -> np.ndarray:
        nq, m = ids.shape
        out = np.full((nq, m), np.inf, dtype=np.float64)
        for i in nb.prange(nq):
            for c in range(m):
                j = ids[i, c]
                if j < 0:
                    continue
                acc = 0.0
                for d in range(q.shape[1]):
                    a = np.float64(q[i, d])
                    b = np.float64(r[j, d])
                    den = abs(a) + abs(b)
                    if den > 0:
                        acc += abs(a - b) / den
                out[i, c] = acc
        return out

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def sampled(q: np.ndarray, r: np.ndarray, dims: np.ndarray) -> np.ndarray:
        nq = q.shape[0]
        nr = r.shape[0]
        m = dims.shape[0]
        qs = np.empty((nq, m), dtype=np.float32)
        rs = np.empty((nr, m), dtype=np.float32)
        for i in range(nq):
            for c in range(m):
                qs[i, c] = q[i, dims[c]]
        for j in nb.prange(nr):
            for c in range(m):
                rs[j, c] = r[j, dims[c]]
        out = np.empty((nq, nr), dtype=np.float32)
        for i in nb.prange(nq):
            for j in range(nr):
                acc = np.float32(0.0)
                for c in range(m):
                    a = qs[i, c]
                    b = rs[j, c]
                    acc += abs(a - b) / max(abs(a) + abs(b), np.float32(1e-30))
                out[i, j] = acc
        return out

    _KERNELS.update(scan=scan, exact_pairs=exact_pairs, sampled=sampled)
    return _KERNELS


def canberra_knn(
    queries: np.ndarray,
    refs: np.ndarray,
    k: int,
    pad: int | None = None,
    seed_dims: int = 128,
    query_block: int = 8,
    ref_block: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (distances, ids) of the k nearest references, nearest first, ties to the lower id.

    Identical to :func:`canberra_knn_reference` (tested); see the module
    docstring for the seed / scan / certify scheme. Distances are float64.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    r = np.ascontiguousarray(refs, dtype=np.float32)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"queries {q.shape} and references {r.shape} do not match")
    if not np.isfinite(q).all():
        raise ValueError("Canberra queries contain NaN or inf")
    n = r.shape[0]
    k = min(k, n)
    if q.shape[0] == 0 or k == 0:
        return np.zeros((q.shape[0], k)), np.zeros((q.shape[0], k), dtype=np.int64)
    try:
        kern = _kernels()
    except ImportError:  # pragma: no cover - numba is a dependency
        log.warning("numba not available; Canberra falls back to the slow numpy path")
        return canberra_knn_reference(q, r, k)
    cap = min(n, k + (pad if pad is not None else max(8, k // 8)))
    # 1. seed bound from an approximate pass on a sample of dimensions
    dim = q.shape[1]
    if dim > 2 * seed_dims and n > 4 * cap:
        dims = np.linspace(0, dim - 1, seed_dims).astype(np.int64)
        approx = kern["sampled"](q, r, dims)  # type: ignore[operator]
        cand = np.argpartition(approx, k - 1, axis=1)[:, :k]
        seed = kern["exact_pairs"](q, r, cand).max(axis=1)  # type: ignore[operator]
        seed = np.nextafter(seed.astype(np.float32), np.float32(np.inf))
    else:
        seed = np.full(q.shape[0], np.inf, dtype=np.float32)
    # 2. fused scan with early abandoning
    hd, hi, sizes, excl = kern["scan"](q, r, seed.astype(np.float32), cap, query_block, ref_block, CHUNK, SLACK)  # type: ignore[operator]
    # 3. certify in float64
    exact = kern["exact_pairs"](q, r, hi)  # type: ignore[operator]
    order = np.lexsort((np.where(hi < 0, np.iinfo(np.int64).max, hi), exact), axis=-1)
    d_out = np.take_along_axis(exact, order, axis=1)[:, :k]
    i_out = np.take_along_axis(hi, order, axis=1)[:, :k]
    kth = d_out[:, k - 1]
    bad = ~(kth < excl.astype(np.float64) * (1.0 - 2 * SLACK)) & np.isfinite(excl)
    bad |= sizes < k
    if bad.any():
        log.debug("canberra: %d of %d queries re-checked by brute force", int(bad.sum()), len(bad))
        rd, ri = canberra_knn_reference(q[bad], r, k)
        d_out[bad], i_out[bad] = rd, ri
    return d_out, i_out.astype(np.int64)


def contribution_order(refs: np.ndarray, n_pairs: int = 512, seed: int = 0) -> np.ndarray:
    """Dimensions sorted by their mean Canberra term over random reference pairs, largest first.

    Canberra is a sum over dimensions, so any order gives the same distance;
    scanning the dimensions that contribute most first makes partial sums
    cross the k-th-neighbour bound sooner (earlier exact abandoning).
    """
    r = np.asarray(refs, dtype=np.float32)
    n = r.shape[0]
    if n < 2:
        return np.arange(r.shape[1])
    rng = np.random.default_rng(seed)
    a = r[rng.integers(0, n, n_pairs)].astype(np.float64)
    b = r[rng.integers(0, n, n_pairs)].astype(np.float64)
    den = np.abs(a) + np.abs(b)
    t = np.divide(np.abs(a - b), den, out=np.zeros_like(den), where=den > 0).mean(axis=0)
    return np.argsort(-t, kind="stable")


class CanberraSearch:
    """Exact Canberra k-NN over fixed references with dimensions in contribution order."""

    def __init__(self, refs: np.ndarray):
        r = np.ascontiguousarray(refs, dtype=np.float32)
        if not np.isfinite(r).all():
            raise ValueError("Canberra references contain NaN or inf")
        self.order = contribution_order(r)
        self.refs = np.ascontiguousarray(r[:, self.order])

    def __len__(self) -> int:
        return int(self.refs.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances float64, ids int64), identical to :func:`canberra_knn_reference`."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32)[:, self.order])
        return canberra_knn(q, self.refs, k)


__all__ = ["CanberraSearch", "canberra_distances", "canberra_knn", "canberra_knn_reference", "contribution_order"]
