"""EWC-FAISS over a reference index: adaptive k, class-reweighted vote, certainty.

The maths lives in :mod:`monitor.classify` (pure numpy, tested on hand-made
neighbour arrays); this module runs it against an index's search. On the
exact L2/cosine path, per block of queries, k_min is one search; the rows
still undecided get their k_max nearest once (one GEMM row and one ``topk``
each) and every later k of the schedule is a prefix of that list, so a query
that doubles k to k_max costs one extra GEMM row, not one search per k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from monitor import classify
from monitor.index.search import _topk
from monitor.records import Embeddings, States

if TYPE_CHECKING:
    from monitor.index.store import ReferenceIndex


@dataclass(frozen=True)
class EWCParams:
    """Adaptive-k range, entropy threshold and reweighting (see :mod:`monitor.classify`)."""

    k_min: int = 10
    k_max: int = 1000
    entropy_threshold: float = 0.5
    reweight: bool = True


def ewc_search(index: ReferenceIndex, queries: np.ndarray, params: EWCParams, block: int = 2048) -> classify.EWCResult:
    """:func:`monitor.classify.adaptive_search` over ``index``, the same result.

    On the exact L2/cosine path, per block of ``block`` queries: k_min is
    one :meth:`search`; the rows still undecided then get their k_max
    nearest once, sorted by (distance, id), and every later k of the
    schedule is a prefix of that list (the k nearest, ties at the k-th by
    reference id). Otherwise each k is a :meth:`search` of the rows still
    undecided.
    """
    x = np.asarray(queries, dtype=np.float32)
    weights = index.weights if params.reweight else None
    args = (index.labels, len(index.classes), weights, params.k_min, params.k_max, params.entropy_threshold)
    if not index.searcher.uses_gemm or x.shape[0] == 0:
        return classify.adaptive_search(index.search, x, *args)
    parts = []
    for s in range(0, x.shape[0], block):
        xb = np.ascontiguousarray(x[s : s + block])
        rows_of = np.full(xb.shape[0], -1, dtype=np.int64)
        nearest: list[tuple[np.ndarray, np.ndarray]] = []

        def block_search(rows: np.ndarray, k: int, xb: np.ndarray = xb, rows_of: np.ndarray = rows_of,
                         nearest: list[tuple[np.ndarray, np.ndarray]] = nearest) -> tuple[np.ndarray, np.ndarray]:
            r = rows[:, 0]
            if not nearest and len(r) == xb.shape[0]:
                return index.search(xb, k)  # the first k, for every row
            if not nearest:  # the rows still undecided: their k_max nearest once; every later k is a prefix
                nearest.append(_topk(index.searcher.distance_rows(xb[r]), min(params.k_max, len(index))))
                rows_of[r] = np.arange(len(r))
            d, i = nearest[0]
            sel, kk = rows_of[r], min(k, len(index))
            return d[sel, :kk], i[sel, :kk]

        # the "queries" handed to adaptive_search are row numbers into the block
        parts.append(classify.adaptive_search(block_search, np.arange(xb.shape[0])[:, None], *args))
    return classify.EWCResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("predicted", "certainty", "k_used", "neighbor_ids", "neighbor_labels", "neighbor_distances")))


class EWCClassifier:
    """EWC-FAISS over a :class:`ReferenceIndex`; parameters from the index unless overridden."""

    def __init__(self, index: ReferenceIndex, ewc: EWCParams | None = None, certainty_floor: float = 0.5, flag_unknown: bool = True):
        self.index = index
        self.params = ewc or index.ewc
        self.certainty_floor = certainty_floor
        #: flag cells farther than the index's calibrated distance from every reference
        self.flag_unknown = flag_unknown and index.unknown_distance is not None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    def classify(self, emb: Embeddings | np.ndarray) -> States:
        """EWC-FAISS states of each row: label, certainty ``1 - H``, k used, neighbours.

        Adaptive k from ``k_min`` doubling to ``k_max`` while the normalised
        entropy exceeds the threshold, then the class-weighted vote
        ``argmax_l sum_j w_{y_j} [y_j = l]`` (unweighted when reweighting is
        off). Rows whose certainty is below ``certainty_floor`` are flagged
        ``uncertain`` (still labelled); rows whose mean distance to their nearest
        references (raw space, :mod:`monitor.index.unknown`) is farther
        than the index's calibrated unknown distance are flagged ``unknown``
        (still labelled; ``unknown`` is None when the index has no
        calibration or the flag is off). Neighbour arrays are padded beyond
        each row's k.
        """
        vectors = emb.vectors if isinstance(emb, Embeddings) else emb
        p = self.params
        if len(vectors) == 0:
            e = np.zeros((0, 0))
            return States(self.classes, np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, bool), e.astype(np.int64), e.astype(np.int64),
                          e.astype(np.float32), np.zeros(0, bool) if self.flag_unknown else None, self.index.version)
        res = ewc_search(self.index, np.asarray(vectors, dtype=np.float32), p)
        check = self.index.unknown
        unknown = check.flag(vectors) if self.flag_unknown and check is not None else None
        return States(
            classes=self.classes,
            predicted=res.predicted,
            certainty=res.certainty,
            k_used=res.k_used,
            uncertain=res.certainty < self.certainty_floor,
            neighbor_ids=res.neighbor_ids,
            neighbor_labels=res.neighbor_labels,
            neighbor_distances=res.neighbor_distances,
            unknown=unknown,
            index_version=self.index.version,
        )


def params_from_config(index: ReferenceIndex, k_min: int | None, k_max: int | None, thr: float | None, reweight: bool | None) -> EWCParams:
    """Config values override the index's stored EWC parameters where given.

    Raises
    ------
    ConfigError
        The merged range is empty (a configured ``k_min`` above the index's ``k_max``, or the
        reverse): one line at start-up and in ``check-config``, not a failure on every frame.
    """
    from monitor.errors import ConfigError

    base = index.ewc
    p = EWCParams(
        k_min=k_min if k_min is not None else base.k_min,
        k_max=k_max if k_max is not None else base.k_max,
        entropy_threshold=thr if thr is not None else base.entropy_threshold,
        reweight=reweight if reweight is not None else base.reweight,
    )
    if p.k_min > p.k_max:
        mine, theirs = ("k_min", "k_max") if k_min is not None else ("k_max", "k_min")
        raise ConfigError(f"[classifier] {mine} = {getattr(p, mine)} but the index's {theirs} is {getattr(p, theirs)}: set [classifier] "
                          f"{theirs} too, or rebuild the index with this config (index build --from-marker takes its EWC settings)")
    return p

