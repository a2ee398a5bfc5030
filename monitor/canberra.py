"""Exact k-NN under the Canberra distance ``sum_d |x_d - y_d| / (|x_d| + |y_d|)``.

Terms with ``|x_d| + |y_d| == 0`` count 0 (as FAISS does). Ties are broken by
the lower reference id.

Two implementations, one answer:

* :func:`canberra_distances` / :func:`canberra_knn_reference` -- plain blocked
  numpy in float64: the definition, and what the tests compare against.
* :func:`canberra_knn` -- the fast path (numba, parallel over query blocks):

  1. *seed*: an approximate pass over a sample of dimensions picks, per
     query, the ``k`` most promising references; the largest of their
     (float32) distances is a first upper bound on the k-th neighbour
     distance (any k references bound it);
  2. *scan*: a fused, cache-blocked kernel walks query blocks (in
     parallel) x reference tiles; a 2 x 2 register block (two queries x two
     references) accumulates four float32 distances per pass over a chunk of
     ``CHUNK`` dimensions with a branch-free, vectorised inner loop, and
     between chunks abandons a pair as soon as its partial sum exceeds the
     query's current bound (all terms are >= 0, so abandoning is exact);
     survivors enter a bounded max-heap of ``k + pad`` candidates;
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

    @nb.njit(inline="always")
    def _offer(hd: np.ndarray, hi: np.ndarray, sizes: np.ndarray, excl: np.ndarray, bound: np.ndarray, t: int, qi: int, cap: int, acc: float, dead: bool, j: int, grow: float) -> None:
        # one finished (or abandoned) pair: into the heap, or its value into excl
        if dead:
            if acc < excl[qi]:
                excl[qi] = acc
            return
        n = sizes[qi]
        if n == cap:
            # the root leaves the heap (or acc does): remember the smaller
            out = acc if (acc > hd[qi, 0] or (acc == hd[qi, 0] and j > hi[qi, 0])) else hd[qi, 0]
            if out < excl[qi]:
                excl[qi] = out
        sizes[qi] = _heap_push(hd[qi], hi[qi], n, cap, acc, j)
        if sizes[qi] == cap:
            nb_ = hd[qi, 0] * grow
            if nb_ < bound[t]:
                bound[t] = nb_

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def scan(q: np.ndarray, r: np.ndarray, seed_bound: np.ndarray, cap: int, qb: int, rb: int, chunk: int, slack: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # Query blocks in parallel; inside, reference tiles x query pairs x
        # reference pairs: a 2 x 2 register block accumulates four distances in
        # one pass over a chunk of dimensions (each loaded value used twice),
        # and stops once all four pairs have exceeded their query's bound.
        nq, dim = q.shape
        nr = r.shape[0]
        hd = np.full((nq, cap), np.inf, dtype=np.float32)
        hi = np.full((nq, cap), -1, dtype=np.int64)
        excl = np.full(nq, np.inf, dtype=np.float32)  # smallest float32 partial/total left out
        sizes = np.zeros(nq, dtype=np.int64)
        nqb = (nq + qb - 1) // qb
        tiny = np.float32(1e-30)
        grow = np.float32(1.0 + 8.0 * slack)
        for b in nb.prange(nqb):
            q0 = b * qb
            q1 = min(nq, q0 + qb)
            bound = np.empty(q1 - q0, dtype=np.float32)
            for t in range(q1 - q0):
                bound[t] = seed_bound[q0 + t] * grow
            for r0 in range(0, nr, rb):
                r1 = min(nr, r0 + rb)
                for t0 in range(0, q1 - q0, 2):
                    t1 = min(t0 + 1, q1 - q0 - 1)  # odd block: the last query pairs with itself
                    x0 = q[q0 + t0]
                    x1 = q[q0 + t1]
                    for j0 in range(r0, r1, 2):
                        j1 = min(j0 + 1, r1 - 1)
                        y0 = r[j0]
                        y1 = r[j1]
                        l0 = bound[t0]
                        l1 = bound[t1]
                        a00 = np.float32(0.0)
                        a01 = np.float32(0.0)
                        a10 = np.float32(0.0)
                        a11 = np.float32(0.0)
                        d00 = False
                        d01 = False
                        d10 = False
                        d11 = False
                        s = 0
                        while s < dim:
                            e = min(dim, s + chunk)
                            # branch-free inner loop over 1-D slices (LLVM
                            # vectorises this form, not range(s, e) on the
                            # rows): den + 1e-30 keeps 0/0 at 0 and stays a
                            # normal float32 (fastmath reciprocals flush
                            # denormals); it can only lower a term, never
                            # wrongly abandon a neighbour
                            u0 = x0[s:e]
                            u1 = x1[s:e]
                            v0 = y0[s:e]
                            v1 = y1[s:e]
                            p00 = np.float32(0.0)
                            p01 = np.float32(0.0)
                            p10 = np.float32(0.0)
                            p11 = np.float32(0.0)
                            for d in range(u0.shape[0]):
                                a = u0[d]
                                c = u1[d]
                                f = v0[d]
                                g = v1[d]
                                aa = abs(a) + tiny
                                ca = abs(c) + tiny
                                fa = abs(f)
                                ga = abs(g)
                                p00 += abs(a - f) / (aa + fa)
                                p01 += abs(a - g) / (aa + ga)
                                p10 += abs(c - f) / (ca + fa)
                                p11 += abs(c - g) / (ca + ga)
                            s = e
                            # a dead pair keeps its value at abandonment (a lower bound)
                            if not d00:
                                a00 += p00
                                d00 = a00 > l0
                            if not d01:
                                a01 += p01
                                d01 = a01 > l0
                            if not d10:
                                a10 += p10
                                d10 = a10 > l1
                            if not d11:
                                a11 += p11
                                d11 = a11 > l1
                            if d00 and d01 and d10 and d11:
                                break
                        _offer(hd, hi, sizes, excl, bound, t0, q0 + t0, cap, a00, d00, j0, grow)
                        if j1 != j0:
                            _offer(hd, hi, sizes, excl, bound, t0, q0 + t0, cap, a01, d01, j1, grow)
                        if t1 != t0:
                            _offer(hd, hi, sizes, excl, bound, t1, q0 + t1, cap, a10, d10, j0, grow)
                            if j1 != j0:
                                _offer(hd, hi, sizes, excl, bound, t1, q0 + t1, cap, a11, d11, j1, grow)
        return hd, hi, sizes, excl

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def exact_pairs(q: np.ndarray, r: np.ndarray, ids: np.ndarray) -> np.ndarray:
        # float64 re-scoring of chosen pairs; den + 1e-300 (a normal double)
        # makes 0/0 = 0 without a branch, and changes no other term (float32
        # inputs give den >= 1.4e-45 when it is not 0)
        nq, m = ids.shape
        out = np.full((nq, m), np.inf, dtype=np.float64)
        for i in nb.prange(nq):
            x = q[i]
            for c in range(m):
                j = ids[i, c]
                if j < 0:
                    continue
                y = r[j]
                acc = 0.0
                for d in range(x.shape[0]):
                    a = np.float64(x[d])
                    b = np.float64(y[d])
                    acc += abs(a - b) / (abs(a) + abs(b) + 1e-300)
                out[i, c] = acc
        return out

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def approx_pairs(q: np.ndarray, r: np.ndarray, ids: np.ndarray) -> np.ndarray:
        # the float32 scan formula on chosen pairs (for the seed bound)
        nq, m = ids.shape
        out = np.full((nq, m), np.inf, dtype=np.float32)
        tiny = np.float32(1e-30)
        for i in nb.prange(nq):
            x = q[i]
            for c in range(m):
                y = r[ids[i, c]]
                acc = np.float32(0.0)
                for d in range(x.shape[0]):
                    a = x[d]
                    b = y[d]
                    acc += abs(a - b) / (abs(a) + abs(b) + tiny)
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

    _KERNELS.update(scan=scan, exact_pairs=exact_pairs, approx_pairs=approx_pairs, sampled=sampled)
    return _KERNELS


def canberra_knn(
    queries: np.ndarray,
    refs: np.ndarray,
    k: int,
    pad: int | None = None,
    seed_dims: int = 128,
    query_block: int = 16,
    ref_block: int = 16,
    batch: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (distances, ids) of the k nearest references, nearest first, ties to the lower id.

    Identical to :func:`canberra_knn_reference` (tested); see the module
    docstring for the seed / scan / certify scheme. Distances are float64.
    Queries are processed ``batch`` at a time (the seed pass holds a
    (batch, N) float32 matrix); each batch is split into query blocks of at
    most ``query_block`` (smaller when needed to give every thread work).
    """
    if queries.shape[0] > batch:
        parts = [canberra_knn(queries[s : s + batch], refs, k, pad, seed_dims, query_block, ref_block, batch) for s in range(0, queries.shape[0], batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
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
        # any k references bound the k-th distance from above; float32 here,
        # the scan widens every bound by (1 + 8 SLACK) against rounding
        seed = kern["approx_pairs"](q, r, cand).max(axis=1)  # type: ignore[operator]
    else:
        seed = np.full(q.shape[0], np.inf, dtype=np.float32)
    # 2. fused scan with early abandoning
    import numba

    per_thread = -(-q.shape[0] // (4 * numba.get_num_threads()))
    qb = max(2, min(query_block, per_thread + per_thread % 2))
    hd, hi, sizes, excl = kern["scan"](q, r, seed.astype(np.float32), cap, qb, ref_block, CHUNK, SLACK)  # type: ignore[operator]
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
