"""Nearest-neighbour search back-ends over the reference vectors.

One :class:`VectorSearch` per index, chosen from the index's metric and
structure:

* exact L2 / cosine (``flat``): FAISS's flat search for k <= ``GEMM_K``; for
  larger k the reference matrix is read in place from the FAISS index (no
  copy) and searched with blocked torch GEMM, ``||x||^2 - 2 x.y + ||y||^2``
  (squared L2, clamped at 0 as FAISS does) or ``1 - x.y`` (cosine), then
  ``torch.topk`` per query block. Neighbours equal FAISS's exact search up to
  float ties (tested).
* HNSW (``hnsw``): FAISS's graph; efSearch is raised to k whenever k exceeds
  it, so a search never returns fewer than k neighbours.
* Canberra: always exact, through :mod:`monitor.index.canberra`; FAISS's own
  slow Canberra search is never used.

Every back-end returns ``(distances, ids)`` nearest first, equal distances in
reference-id order; cosine distances are ``1 - cos``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Metric = Literal["l2", "cosine", "canberra"]
Structure = Literal["auto", "flat", "hnsw"]
GEMM_K = 64  # exact flat searches for k above this use the GEMM + topk path


@dataclass(frozen=True)
class HNSWParams:
    """HNSW graph degree M, efConstruction and the default efSearch (never below k)."""

    m: int = 32
    ef_construction: int = 40
    ef_search: int = 64


def build_faiss(x: np.ndarray, metric: Metric, structure: str, hnsw: HNSWParams) -> Any:
    """A FAISS index holding the prepared vectors ``x`` (Canberra: a flat store only)."""
    import faiss

    d = x.shape[1]
    index: Any
    if metric == "canberra":
        index = faiss.IndexFlat(d, faiss.METRIC_Canberra)
    elif structure == "hnsw":
        fm = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.IndexHNSWFlat(d, hnsw.m, fm)
        index.hnsw.efConstruction = hnsw.ef_construction
    else:
        index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    index.add(x)
    return index


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
