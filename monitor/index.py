"""The reference index on disk and the EWC-FAISS classifier over it.

An index is a folder::

    meta.json      format version, encoders (name, id, dim, version),
                   preprocessing (how files became crops), metric,
                   normalisation, search structure and HNSW parameters,
                   classes and counts, class weights, EWC parameters,
                   SHA-256 of every other file
    vectors.faiss  the FAISS index (written by faiss.write_index)
    labels.npy     int64 class index per reference (np.load, allow_pickle=False)
    ids.json       optional source name per reference (file name, box)

Nothing is unpickled. Loading checks the format version, that every file
is present and matches its checksum, the label count against the FAISS size
(and the names in ids.json), the dimension against the encoders' dims, and
(when encoders are given) that their ids and dims match; any mismatch is
fatal: one :class:`~monitor.errors.IndexError_` line naming the index folder.

Metrics: ``l2`` (default, squared L2 distances as FAISS reports them),
``cosine`` (vectors L2-normalised, inner product; distance = 1 - cos) and
``canberra`` (always exact, through the fast path of :mod:`monitor.canberra`;
the vectors are stored in a FAISS ``IndexFlat`` but FAISS's own slow Canberra
search is never used). Search structure: exact (``flat``) up to
``hnsw_above`` references, HNSW above, or forced; HNSW's efSearch is raised to
k whenever k exceeds it, so a search never returns fewer than k neighbours.

Exact L2 and cosine search for large k does not use FAISS's own flat search: the
reference matrix is read in place from the FAISS index (no copy) and searched
with blocked torch (MKL) GEMM, ``||x||^2 - 2 x.y + ||y||^2`` (squared L2,
clamped at 0 as FAISS does) or ``1 - x.y`` (cosine), then ``torch.topk`` per
query block. The neighbours equal FAISS's exact search up to float ties (the
two sum in different orders; tested), ties are ordered by reference id.
It is used for k > ``GEMM_K``: for small k FAISS's own flat search (BLAS
GEMM with a small heap) is as fast or faster on this machine (measured).
:class:`EWCClassifier` runs k_min through :meth:`ReferenceIndex.search`, then
computes the distance matrix of the rows still undecided once per block and
runs the rest of the adaptive-k schedule on it with ``topk``, so a query that
doubles k to k_max costs one extra GEMM row, not one per k.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from monitor import classify
from monitor.errors import IndexError_
from monitor.records import Embeddings, States

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
Metric = Literal["l2", "cosine", "canberra"]
Structure = Literal["auto", "flat", "hnsw"]
GEMM_K = 64  # exact flat searches for k above this use the GEMM + topk path


@dataclass(frozen=True)
class EWCParams:
    """Adaptive-k range, entropy threshold and reweighting (see :mod:`monitor.classify`)."""

    k_min: int = 10
    k_max: int = 1000
    entropy_threshold: float = 0.5
    reweight: bool = True


@dataclass(frozen=True)
class HNSWParams:
    """HNSW graph degree M, efConstruction and the default efSearch (never below k)."""

    m: int = 32
    ef_construction: int = 40
    ef_search: int = 64


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ReferenceIndex:
    """Labelled reference embeddings behind a FAISS (or exact Canberra) search."""

    def __init__(
        self,
        vectors_index: Any,
        labels: np.ndarray,
        classes: Sequence[str],
        encoders: Sequence[dict[str, Any]],
        metric: Metric,
        structure: str,
        ewc: EWCParams,
        hnsw: HNSWParams,
        normalize: bool = False,
        ref_names: Sequence[str] | None = None,
        raw_vectors: np.ndarray | None = None,
        preprocessing: dict[str, Any] | None = None,
    ):
        self.faiss_index = vectors_index
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self.encoders = [dict(e) for e in encoders]
        self.metric: Metric = metric
        self.structure = structure
        self.ewc = ewc
        self.hnsw = hnsw
        self.normalize = normalize
        self.ref_names = list(ref_names) if ref_names is not None else None
        self._raw = raw_vectors  # kept for the exact Canberra path
        self._canberra: Any = None
        self.preprocessing = dict(preprocessing) if preprocessing is not None else None
        self.weights = classify.class_weights(self.labels, len(self.classes))
        self._exact: tuple[Any, Any] | None = None  # (torch refs view, squared norms) for the GEMM path

    # ---- construction -------------------------------------------------
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        encoders: Sequence[dict[str, Any]],
        metric: Metric = "l2",
        structure: Structure = "auto",
        ewc: EWCParams = EWCParams(),
        hnsw: HNSWParams = HNSWParams(),
        hnsw_above: int = 50_000,
        normalize: bool = False,
        ref_names: Sequence[str] | None = None,
        preprocessing: dict[str, Any] | None = None,
    ) -> ReferenceIndex:
        """Build the search structure over (N, D) float32 vectors.

        ``structure="auto"`` picks exact search up to ``hnsw_above`` references
        and HNSW above (Canberra is always exact). ``encoders`` lists
        ``{"name", "id", "dim"}`` (optionally ``"version"``) in concatenation
        order; their dims must sum to D. ``preprocessing`` records how files
        became crops. Raises ValueError on inconsistent inputs.
        """
        import faiss

        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"need a non-empty (N, D) matrix of reference vectors (got shape {x.shape})")
        if len(labels) != x.shape[0]:
            raise ValueError(f"{len(labels)} labels for {x.shape[0]} vectors")
        dim_sum = sum(int(e["dim"]) for e in encoders)
        if dim_sum != x.shape[1]:
            raise ValueError(f"encoder dims sum to {dim_sum} but vectors have {x.shape[1]} columns")
        if structure == "auto":
            structure = "hnsw" if x.shape[0] > hnsw_above and metric != "canberra" else "flat"
        x = _prepare(x, metric, normalize)
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
        if ref_names is not None and len(ref_names) != x.shape[0]:
            raise ValueError(f"{len(ref_names)} reference names for {x.shape[0]} vectors")
        if hnsw.ef_search < 1 or hnsw.m < 2 or hnsw.ef_construction < 1:
            raise ValueError(f"bad HNSW parameters {hnsw}")
        return cls(index, labels, classes, encoders, metric, structure, ewc, hnsw, normalize, ref_names, x if metric == "canberra" else None, preprocessing)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    @property
    def class_counts(self) -> dict[str, int]:
        c = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, c, strict=True)}

    # ---- search -------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), nearest first, equal distances by reference id; cosine distances are ``1 - cos``."""
        x = _prepare(np.ascontiguousarray(queries, dtype=np.float32), self.metric, self.normalize)
        k = min(k, len(self))
        if self.metric == "canberra":
            from monitor.canberra import CanberraSearch

            if self._canberra is None:
                assert self._raw is not None
                self._canberra = CanberraSearch(self._raw)
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

    def ewc_search(self, queries: np.ndarray, params: EWCParams, block: int = 2048) -> classify.EWCResult:
        """:func:`monitor.classify.adaptive_search` over this index, the same result.

        On the exact L2/cosine path, per block of ``block`` queries: k_min is
        one :meth:`search`; the distance matrix of the rows still undecided
        is then computed once and every later k of the schedule is a
        ``topk`` on it. Otherwise each k is a :meth:`search` of the rows still
        undecided.
        """
        x = np.asarray(queries, dtype=np.float32)
        weights = self.weights if params.reweight else None
        args = (self.labels, len(self.classes), weights, params.k_min, params.k_max, params.entropy_threshold)
        if not self.uses_gemm or x.shape[0] == 0:
            return classify.adaptive_search(self.search, x, *args)
        parts = []
        for s in range(0, x.shape[0], block):
            xb = np.ascontiguousarray(x[s : s + block])
            rows_of: dict[int, int] = {}
            dist: list[Any] = []

            def block_search(rows: np.ndarray, k: int, xb: np.ndarray = xb, rows_of: dict[int, int] = rows_of, dist: list[Any] = dist) -> tuple[np.ndarray, np.ndarray]:
                r = rows[:, 0]
                if not dist and len(r) == xb.shape[0]:
                    return self.search(xb, k)  # the first k, for every row
                if not dist:  # the rows still undecided: their distances once
                    xp = _prepare(xb[r], self.metric, self.normalize)
                    dist.append(_concat_rows([self._distance_block(xp[a:b]) for a, b in self._blocks(len(r))]))
                    rows_of.update({int(v): i for i, v in enumerate(r)})
                return _topk(dist[0][np.array([rows_of[int(v)] for v in r])], min(k, len(self)))

            # the "queries" handed to adaptive_search are row numbers into the block
            parts.append(classify.adaptive_search(block_search, np.arange(xb.shape[0])[:, None], *args))
        return classify.EWCResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("predicted", "certainty", "k_used", "neighbor_ids", "neighbor_labels", "neighbor_distances")))

    # ---- persistence --------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the index folder (meta.json last, atomically, so a torn write is refused)."""
        import faiss

        from monitor import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.faiss_index, str(folder / "vectors.faiss"))
        np.save(folder / "labels.npy", self.labels, allow_pickle=False)
        files = ["vectors.faiss", "labels.npy"]
        if self.ref_names is not None:
            (folder / "ids.json").write_text(json.dumps(self.ref_names))
            files.append("ids.json")
        meta = {
            "format_version": FORMAT_VERSION,
            "cellmonitor_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "encoders": self.encoders,
            "dim": self.dim,
            "n_references": len(self),
            "preprocessing": self.preprocessing,
            "metric": self.metric,
            "normalize": self.normalize,
            "structure": self.structure,
            "hnsw": vars(self.hnsw),
            "classes": list(self.classes),
            "class_counts": self.class_counts,
            "class_weights": [float(w) for w in self.weights],
            "ewc": vars(self.ewc),
            "reference_names": self.ref_names is not None,
            "checksums": {f: _sha256(folder / f) for f in files},
        }
        tmp = folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(folder / "meta.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoders: Sequence[dict[str, Any]] | None = None) -> ReferenceIndex:
        """Load and validate; refuse any mismatch with one line naming the folder."""
        import faiss

        folder = Path(folder)

        def fail(msg: str) -> IndexError_:
            return IndexError_(f"{folder}: {msg}")

        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise fail("not a cellmonitor index (no meta.json); build one with 'cellmonitor index build'")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise fail(f"meta.json is unreadable ({e})") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            got = meta.get("format_version") if isinstance(meta, dict) else None
            raise fail(f"index format {got!r} is not supported (expected {FORMAT_VERSION}); rebuild it with 'cellmonitor index build'")
        missing_keys = [k for k in ("encoders", "metric", "structure", "classes", "ewc", "hnsw", "checksums") if k not in meta]
        if missing_keys:
            raise fail(f"meta.json lacks {', '.join(missing_keys)}")
        checks = meta["checksums"]
        for f in ("vectors.faiss", "labels.npy"):
            if f not in checks:
                raise fail(f"meta.json has no checksum for {f}")
        for f, digest in checks.items():
            p = folder / f
            if not p.is_file():
                raise fail(f"{f} is missing")
            if _sha256(p) != digest:
                raise fail(f"{f} does not match its checksum in meta.json (corrupt or edited)")
        try:
            labels = np.load(folder / "labels.npy", allow_pickle=False)
            index = faiss.read_index(str(folder / "vectors.faiss"))
        except Exception as e:
            raise fail(f"cannot read index files ({e})") from None
        if labels.ndim != 1 or index.ntotal != labels.shape[0]:
            raise fail(f"{labels.shape[0]} labels for {index.ntotal} vectors")
        dim_sum = sum(int(e["dim"]) for e in meta["encoders"])
        if dim_sum != index.d:
            raise fail(f"vectors have dim {index.d} but the recorded encoders' dims sum to {dim_sum}")
        classes = meta["classes"]
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise fail("labels refer to classes not listed in meta.json")
        if encoders is not None:
            want = [(e["id"], int(e["dim"])) for e in meta["encoders"]]
            got = [(e["id"], int(e["dim"])) for e in encoders]
            if want != got:
                raise fail(
                    "built with encoders "
                    + ", ".join(f"{i} (dim {d})" for i, d in want)
                    + " but the configuration gives "
                    + ", ".join(f"{i} (dim {d})" for i, d in got)
                )
        names = None
        if (folder / "ids.json").is_file():
            names = json.loads((folder / "ids.json").read_text())
            if not isinstance(names, list) or len(names) != labels.shape[0]:
                raise fail(f"ids.json names {len(names) if isinstance(names, list) else '?'} references for {labels.shape[0]} vectors")
        raw = None
        if meta["metric"] == "canberra":
            raw = index.reconstruct_n(0, index.ntotal)
        return cls(
            index,
            labels,
            classes,
            meta["encoders"],
            meta["metric"],
            meta["structure"],
            EWCParams(**meta["ewc"]),
            HNSWParams(**meta["hnsw"]),
            bool(meta.get("normalize", False)),
            names,
            raw,
            meta.get("preprocessing"),
        )


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


class EWCClassifier:
    """EWC-FAISS over a :class:`ReferenceIndex`; parameters from the index unless overridden."""

    def __init__(self, index: ReferenceIndex, ewc: EWCParams | None = None, certainty_floor: float = 0.5):
        self.index = index
        self.params = ewc or index.ewc
        self.certainty_floor = certainty_floor

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    def classify(self, emb: Embeddings | np.ndarray) -> States:
        """EWC-FAISS states of each row: label, certainty ``1 - H``, k used, neighbours.

        Adaptive k from ``k_min`` doubling to ``k_max`` while the normalised
        entropy exceeds the threshold, then the class-weighted vote
        ``argmax_l sum_j w_{y_j} [y_j = l]`` (unweighted when reweighting is
        off). Rows whose certainty is below ``certainty_floor`` are flagged
        ``uncertain`` (still labelled). Neighbour arrays are padded beyond
        each row's k.
        """
        vectors = emb.vectors if isinstance(emb, Embeddings) else emb
        p = self.params
        if len(vectors) == 0:
            e = np.zeros((0, 0))
            return States(self.classes, np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, bool), e.astype(np.int64), e.astype(np.int64), e.astype(np.float32))
        res = self.index.ewc_search(np.asarray(vectors, dtype=np.float32), p)
        return States(
            classes=self.classes,
            predicted=res.predicted,
            certainty=res.certainty,
            k_used=res.k_used,
            uncertain=res.certainty < self.certainty_floor,
            neighbor_ids=res.neighbor_ids,
            neighbor_labels=res.neighbor_labels,
            neighbor_distances=res.neighbor_distances,
        )


def params_from_config(index: ReferenceIndex, k_min: int | None, k_max: int | None, thr: float | None, reweight: bool | None) -> EWCParams:
    """Config values override the index's stored EWC parameters where given."""
    base = index.ewc
    return EWCParams(
        k_min=k_min if k_min is not None else base.k_min,
        k_max=k_max if k_max is not None else base.k_max,
        entropy_threshold=thr if thr is not None else base.entropy_threshold,
        reweight=reweight if reweight is not None else base.reweight,
    )

