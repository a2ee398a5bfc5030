"""Exact k-NN under the Canberra distance ``sum_d |x_d - y_d| / (|x_d| + |y_d|)``.

Terms with ``|x_d| + |y_d| == 0`` count 0 (as FAISS does). This is the plain
blocked numpy reference; see the module's fast path for large indexes.
"""

from __future__ import annotations

import numpy as np


def canberra_distances(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """(Q, N) exact Canberra distances, blocked to bound memory."""
    q = np.asarray(queries, dtype=np.float32)
    r = np.asarray(refs, dtype=np.float32)
    out = np.empty((q.shape[0], r.shape[0]), dtype=np.float32)
    ra = np.abs(r)
    block = max(1, int(2**24 // max(1, r.shape[1] * 8)))
    for i, x in enumerate(q):
        xa = np.abs(x)
        for s in range(0, r.shape[0], block):
            num = np.abs(r[s : s + block] - x)
            den = ra[s : s + block] + xa
            out[i, s : s + block] = np.divide(num, den, out=np.zeros_like(num), where=den > 0).sum(axis=1)
    return out


def canberra_knn(queries: np.ndarray, refs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of the k nearest references, nearest first (stable on ties)."""
    d = canberra_distances(queries, refs)
    k = min(k, d.shape[1])
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx.astype(np.int64)
