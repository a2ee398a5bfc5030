"""Nearest-neighbour search back-ends over the reference vectors.

One :class:`VectorSearch` per index, chosen from the index's metric and
structure:

* exact L2 / cosine (``flat``): FAISS's flat search for k <= ``GEMM_K`` (its
  blocked BLAS GEMM with a heap per query costs less than the torch GEMM +
  ``topk`` below at every k up to 1,000: measured at 128 and 4,608 dims over
  14,424 references, ``bench/bench_search.py``); for larger k the reference matrix is read in place from the FAISS index (no
  copy) and searched with blocked torch GEMM, ``||x||^2 - 2 x.y + ||y||^2``
  (squared L2, clamped at 0 as FAISS does) or ``1 - x.y`` (cosine), then
  ``torch.topk`` per query block. Neighbours equal FAISS's exact search up to
  float ties (tested).
* HNSW (``hnsw``): FAISS's graph. Its efSearch is chosen at build time by a
  recall probe (:func:`build_faiss`, :class:`ProbeSpec`): a random sample of
  the references is held out of the graph, their exact k nearest neighbours
  among the others are computed, and the smallest efSearch of a ladder
  (k, 1.5k, 2k, 3k, ...) whose recall@k reaches the target (0.95) is kept
  and recorded (:class:`ProbeResult`, ``meta.json`` ``search_probe``); the
  held-out references are then added to the graph. At query time efSearch is
  raised to k whenever k exceeds it, so a search never returns fewer than k
  neighbours.
* Canberra: always exact, through :mod:`monitor.index.canberra`; FAISS's own
  slow Canberra search is never used.

Every back-end returns ``(distances, ids)`` nearest first, equal distances in
reference-id order; cosine distances are ``1 - cos``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Metric = Literal["l2", "cosine", "canberra"]
Structure = Literal["auto", "flat", "hnsw"]
GEMM_K = 1024  # exact flat searches for k above this use the GEMM + topk path


@dataclass(frozen=True)
class HNSWParams:
    """HNSW graph degree M, efConstruction and the efSearch used when no probe chose one (never below k).

    efConstruction 80, not FAISS's 40: on 10^6 clustered 128-d references the
    efConstruction-40 graph never reached recall@100 0.95 (0.944 at efSearch
    1,600), the efConstruction-80 one did at efSearch 100 (0.978), for 11%
    more build time (``bench/results/search*.md``).
    """

    m: int = 32
    ef_construction: int = 80
    ef_search: int = 64


@dataclass(frozen=True)
class ProbeSpec:
    """How an HNSW index picks its efSearch at build time (see :func:`build_faiss`).

    ``queries`` references (at most a tenth of them) are held out of the graph
    as probe queries; the efSearch ladder is ``k`` times ``ladder`` (never
    below k); the first rung whose recall@k reaches ``recall_target`` is kept.
    """

    recall_target: float = 0.95
    queries: int = 1000
    ladder: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"recall target must be in (0, 1] (got {self.recall_target})")
        if self.queries < 1:
            raise ValueError(f"probe queries must be >= 1 (got {self.queries})")


@dataclass(frozen=True)
class ProbeResult:
    """What the build-time probe measured (recorded in ``meta.json`` as ``search_probe``).

    ``ef_search`` is the efSearch the index searches with; ``recall`` its
    recall@``k`` on ``queries`` held-out references against exact search;
    ``met`` whether that reaches ``target``; ``tried`` every (efSearch, recall)
    rung measured, in order.
    """

    k: int
    ef_search: int
    recall: float
    target: float
    queries: int
    met: bool
    tried: tuple[tuple[int, float], ...]
    seconds: float


def build_faiss(x: np.ndarray, metric: Metric, structure: str, hnsw: HNSWParams, probe: ProbeSpec | None = None,
                k: int = 100) -> tuple[Any, ProbeResult | None]:
    """A FAISS index holding the prepared vectors ``x`` (Canberra: a flat store only), and the HNSW probe's result.

    HNSW with a ``probe``: the probe's references are held out, the graph is
    built on the rest, efSearch is chosen on them (:func:`probe_ef_search`,
    recall@``k``), then they are added and the graph is renumbered so that
    id i is row i of ``x`` again. Without a probe (or with too few references
    to hold any out) efSearch stays ``hnsw.ef_search`` and the result is None.
    """
    import faiss

    d = x.shape[1]
    index: Any
    if metric == "canberra":
        index = faiss.IndexFlat(d, faiss.METRIC_Canberra)
    elif structure == "hnsw":
        fm = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.IndexHNSWFlat(d, hnsw.m, fm)
        index.hnsw.efConstruction = hnsw.ef_construction
        n = x.shape[0]
        h = min(probe.queries, n // 10) if probe is not None else 0
        if probe is None or h < 1 or n - h < 2:
            index.add(x)
            return index, None
        held = np.sort(np.random.default_rng(probe.seed).choice(n, h, replace=False))
        keep = np.ones(n, bool)
        keep[held] = False
        index.add(x[keep])
        result = probe_ef_search(index, x[keep], x[held], metric, min(k, n - h), probe)
        index.add(x[held])
        # graph position of row i of x: kept rows first, in order, then the held-out ones
        index.permute_entries(np.argsort(np.concatenate([np.flatnonzero(keep), held]), kind="stable").astype(np.int64))
        return index, result
    else:
        index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    index.add(x)
    return index, None


def probe_ef_search(index: Any, refs: np.ndarray, queries: np.ndarray, metric: Metric, k: int, spec: ProbeSpec) -> ProbeResult:
    """The smallest efSearch of ``spec``'s ladder whose recall@k on ``queries`` reaches the target.

    ``index`` is an HNSW graph over ``refs`` (the queries are not in it).
    Recall@k: the share of the k neighbours returned that are within the
    exact k-th neighbour's distance (exact: FAISS flat over ``refs``; ties
    at the k-th distance count as hits). When no rung reaches the target, a
    WARNING says so and the rung with the best recall is kept. The choice is
    logged on one line; ``index.hnsw.efSearch`` is left at it.
    """
    import faiss

    t0 = time.perf_counter()
    k = max(1, min(k, refs.shape[0]))
    flat = faiss.IndexFlatIP(refs.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(refs.shape[1])
    flat.add(refs)
    exact, _ = flat.search(queries, k)
    del flat
    sign = -1.0 if metric == "cosine" else 1.0  # inner products: larger is nearer
    rungs = sorted({min(max(k, int(round(k * f))), refs.shape[0]) for f in spec.ladder}) or [k]
    tried: list[tuple[int, float]] = []
    for ef in rungs:
        index.hnsw.efSearch = ef
        dist, ids = index.search(queries, k)
        tried.append((ef, recall_at_k(sign * dist, ids, sign * exact)))
        if tried[-1][1] >= spec.recall_target:
            break
    ef, recall = max(tried, key=lambda t: (t[1], -t[0]))  # the first that met, else the best (smallest on ties)
    met = recall >= spec.recall_target
    index.hnsw.efSearch = ef
    res = ProbeResult(k, ef, round(recall, 4), spec.recall_target, int(queries.shape[0]), met, tuple(tried), round(time.perf_counter() - t0, 3))
    ladder = ", ".join(f"{e}: {r:.3f}" for e, r in tried)
    if met:
        log.info("HNSW efSearch %d: recall@%d %.3f >= %.2f on %d held-out references (tried %s; %.1f s)",
                 ef, k, recall, spec.recall_target, res.queries, ladder, res.seconds)
    else:
        log.warning("HNSW efSearch: no rung reached recall@%d %.2f on %d held-out references (tried %s); using the best, %d (recall %.3f); "
                    "raise M or efConstruction, or search exactly (--structure flat)", k, spec.recall_target, res.queries, ladder, ef, recall)
    return res


def recall_at_k(dist: np.ndarray, ids: np.ndarray, exact: np.ndarray) -> float:
    """Recall@k of an approximate search against the exact one, both (n, k) distances, smaller nearer.

    The share of the k neighbours returned that lie within the exact k-th
    neighbour's distance (a relative 1e-5 of float slack), averaged over the
    queries: the usual id-overlap recall, except that a reference tied with
    the exact k-th counts as found (which of several tied references a
    search returns is unspecified). Missing neighbours (id -1) count as misses.
    """
    k = exact.shape[1]
    if k == 0 or exact.shape[0] == 0:
        return 1.0
    kth = exact[:, k - 1 : k]
    hits = ((ids[:, :k] >= 0) & (dist[:, :k] <= kth + 1e-5 * np.maximum(np.abs(kth), 1e-6))).sum(axis=1)
    return float(np.mean(np.minimum(hits, k)) / k)


class VectorSearch:
    """k-NN over a FAISS index of prepared vectors, with the exact fast paths above."""

    def __init__(self, faiss_index: Any, metric: Metric, structure: str, hnsw: HNSWParams, normalize: bool = False, conditioner: Any = None):
        self.faiss_index = faiss_index
        #: the index's feature conditioning (:class:`monitor.index.condition.Conditioner`), applied to every query
        self.conditioner = conditioner
        self.metric: Metric = metric
        self.structure = structure
        self.hnsw = hnsw
        self.normalize = normalize
        self._canberra: Any = None
        self._exact: tuple[Any, Any] | None = None  # (torch refs view, squared norms) for the GEMM path

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def dim(self) -> int:
        """Length of the stored (prepared) vectors."""
        return int(self.faiss_index.d)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Raw query vectors as the stored vectors were: conditioned (when the index has a
        conditioning), then float32, L2-normalised for cosine or ``normalize``."""
        if self.conditioner is not None:
            x = self.conditioner.apply(x)
        return _prepare(x, self.metric, self.normalize)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), nearest first, equal distances by reference id; cosine distances are ``1 - cos``."""
        x = self.prepare(np.ascontiguousarray(queries, dtype=np.float32))
        k = min(k, len(self))
        if self.metric == "canberra":
            from monitor.index.canberra import (
                CanberraSearch,  # numba: imported only when Canberra is asked for
            )

            if self._canberra is None:
                self._canberra = CanberraSearch(self.faiss_index.reconstruct_n(0, len(self)))
            d64, i64 = self._canberra.search(x, k)
            return d64.astype(np.float32), i64
        if self.uses_gemm and k > GEMM_K:
            if x.shape[0] == 0 or k == 0:
                return np.zeros((x.shape[0], k), np.float32), np.zeros((x.shape[0], k), np.int64)
            parts = [_topk(self._distance_block(x[s:e]), k) for s, e in self._blocks(x.shape[0])]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if self.structure == "hnsw":
            # efSearch never below k, or HNSW returns fewer than k neighbours
            self.faiss_index.hnsw.efSearch = max(self.hnsw.ef_search, k)
        d, i = self.faiss_index.search(x, k)
        if self.metric == "cosine":
            d = 1.0 - d
        return _ties_by_id(d, i)

    @property
    def uses_gemm(self) -> bool:
        """True when searches run on the blocked GEMM path (exact L2 or cosine)."""
        return self.structure == "flat" and self.metric in ("l2", "cosine")

    def add_prepared(self, x: np.ndarray) -> None:
        """Append prepared reference rows (the exact-search caches are rebuilt on next use)."""
        self.faiss_index.add(np.ascontiguousarray(x, dtype=np.float32))
        self._exact = None
        self._canberra = None

    def _blocks(self, n_queries: int) -> list[tuple[int, int]]:
        # a block's (B, N) float32 distance matrix stays near 64 MiB
        b = int(min(2048, max(32, (1 << 24) // max(1, len(self)))))
        return [(s, min(n_queries, s + b)) for s in range(0, n_queries, b)]

    def _refs(self) -> tuple[Any, Any]:
        import faiss
        import torch

        if self._exact is None:
            n, d = len(self), self.dim
            # a view of the FAISS index's own storage: no second copy of the references
            view = faiss.rev_swig_ptr(self.faiss_index.get_xb(), n * d).reshape(n, d)
            refs = torch.from_numpy(view)
            norms = (refs * refs).sum(dim=1) if self.metric == "l2" else None
            self._exact = (refs, norms)
        return self._exact

    def _distance_block(self, x: np.ndarray) -> Any:
        """(B, N) torch float32 distances of prepared query rows to every reference."""
        import torch

        refs, norms = self._refs()
        q = torch.from_numpy(np.ascontiguousarray(x))
        if self.metric == "cosine":
            return torch.addmm(torch.ones((), dtype=torch.float32), q, refs.T, beta=1.0, alpha=-1.0)
        d = torch.addmm(norms[None, :], q, refs.T, beta=1.0, alpha=-2.0)
        d += (q * q).sum(dim=1, keepdim=True)
        return d.clamp_(min=0.0)

    def distance_rows(self, x: np.ndarray) -> Any:
        """(B, N) torch distances of raw query rows to every reference (exact GEMM path only)."""
        xp = self.prepare(x)
        return _concat_rows([self._distance_block(xp[a:b]) for a, b in self._blocks(len(xp))])


def _concat_rows(blocks: list[Any]) -> Any:
    import torch

    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)


def _topk(dist: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k smallest of each row of a torch (B, N) matrix: (distances float32, ids int64), nearest first.

    Policy: equal distances are ordered by reference id (``torch.topk`` leaves
    them in any order); which of several references tied exactly at the k-th
    distance gets in is unspecified, as in FAISS.
    """
    import torch

    if dist.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    v, i = torch.topk(dist, k, dim=1, largest=False, sorted=True)
    return _ties_by_id(v.numpy(), i.numpy().astype(np.int64))


def _ties_by_id(d: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (distance, id): equal distances in reference-id order (-1 padding last)."""
    if d.shape[1] > 1 and bool((d[:, 1:] == d[:, :-1]).any()):
        key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
        order = np.lexsort((key, d), axis=-1)
        d, ids = np.take_along_axis(d, order, axis=1), np.take_along_axis(ids, order, axis=1)
    return np.ascontiguousarray(d), np.ascontiguousarray(ids)


def _prepare(x: np.ndarray, metric: str, normalize: bool) -> np.ndarray:
    if metric == "cosine" or normalize:
        n = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(n, 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)
