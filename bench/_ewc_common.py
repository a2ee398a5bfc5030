"""Shared helpers of the EWC benchmarks (data locations, encoders, cached embedding)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CELLMONITOR_SHARED_DATA", REPO.parent / "shared" / "data"))
LITES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

_ENCODERS: dict[str, Any] = {}


def encoder(name: str) -> Any:
    """Build an encoder by plugin name once per process."""
    if name not in _ENCODERS:
        from monitor.config import PluginRef
        from monitor.protocols import BuildContext
        from monitor.registry import Registry

        _ENCODERS[name] = Registry().build("encoders", PluginRef(name=name), BuildContext(state_dir=Path("/tmp")))
    return _ENCODERS[name]


def embedded(data: Path, names: tuple[str, ...], prep: Any, classes: list[str] | None = None, progress: bool = True) -> Any:
    from monitor.index.cache import EmbeddingCache, embed_dataset
    from monitor.index.dataset import scan

    ds = scan(data, classes)
    return embed_dataset(ds, [encoder(n) for n in names], prep, EmbeddingCache(), batch_size=32, progress=progress)


def need_data() -> None:
    if not DATA.is_dir():
        print(f"real data not found at {DATA}; set CELLMONITOR_SHARED_DATA", file=sys.stderr)
        sys.exit(2)


def canberra_pruning(refs: Any, queries: Any, k: int, chunk: int = 256) -> tuple[float, float]:
    """Data realism for exact early abandoning, in float64 numpy on a few queries.

    Returns (mean over queries of k-th neighbour distance / mean distance,
    fraction of all terms that must be computed when every reference is
    abandoned at the first ``chunk`` boundary where its partial sum, with the
    dimensions in :func:`monitor.index.canberra.contribution_order`, exceeds the
    exact k-th distance). The second number is the best any exact
    chunk-wise abandoning can do; the real scan starts from a looser bound.
    """
    import numpy as np

    from monitor.index.canberra import contribution_order

    order = contribution_order(refs)
    r = np.asarray(refs, dtype=np.float64)[:, order]
    dim = r.shape[1]
    edges = np.array([*range(chunk, dim, chunk), dim])
    ratios, fracs = [], []
    for x in np.asarray(queries, dtype=np.float64)[:, order]:
        den = np.abs(r) + np.abs(x)
        t = np.divide(np.abs(r - x), den, out=np.zeros_like(den), where=den > 0)
        cs = np.cumsum(t, axis=1)
        full = cs[:, -1]
        kth = np.sort(full)[k - 1]
        ratios.append(kth / full.mean())
        over = cs[:, edges - 1] > kth
        first = np.where(over.any(axis=1), over.argmax(axis=1), len(edges) - 1)
        fracs.append(edges[first].sum() / (r.shape[0] * dim))
    return float(np.mean(ratios)), float(np.mean(fracs))


def dense_canberra_rate(refs: Any, queries: Any) -> tuple[float, float]:
    """Terms/s of a plain fused numba Canberra kernel (no pruning): all threads, and one thread.

    The kernel is the obvious one (parallel over references, branch-free
    float32 inner loop over dimensions); its rate is this machine's
    brute-force bound for the fast path's scan.
    """
    import time

    import numba as nb
    import numpy as np

    @nb.njit(parallel=True, fastmath=True)
    def dense(q: Any, r: Any) -> Any:  # pragma: no cover - numba
        out = np.empty((q.shape[0], r.shape[0]), np.float32)
        for j in nb.prange(r.shape[0]):
            y = r[j]
            for i in range(q.shape[0]):
                x = q[i]
                acc = np.float32(0.0)
                for d in range(x.shape[0]):
                    acc += abs(x[d] - y[d]) / (abs(x[d]) + abs(y[d]) + np.float32(1e-30))
                out[i, j] = acc
        return out

    q = np.ascontiguousarray(queries, dtype=np.float32)
    r = np.ascontiguousarray(refs, dtype=np.float32)
    dense(q[:2], r[:4])
    t = time.perf_counter()
    dense(q, r)
    rate = q.size * r.shape[0] / (time.perf_counter() - t)
    threads = nb.get_num_threads()
    nb.set_num_threads(1)
    try:
        t = time.perf_counter()
        dense(q[:8], r)
        one = 8 * r.size / (time.perf_counter() - t)
    finally:
        nb.set_num_threads(threads)
    return rate, one


def emit(lines: list[str], write: Path | None) -> None:
    """Print a bench's result table and, with ``--write FILE``, store it."""
    out = "\n".join(lines)
    print(out)
    if write:
        write.write_text(out + "\n")
