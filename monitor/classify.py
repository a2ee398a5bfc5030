"""EWC-FAISS maths on plain arrays: class weights, entropy, adaptive k, vote.

The method follows ``shared/DOMAIN.md`` section 2 (Kalweit et al. 2025, whose
formulas were lost in the text copy; where the two differ this module follows
DOMAIN.md):

* class weights ``w_c = N / (C * n_c)`` from the reference labels;
* normalised entropy of the *unweighted* label frequencies of the k nearest
  neighbours, ``H = -sum_c p_c log p_c / log(min(k, C))`` in [0, 1]
  (the paper normalises "relative to the number of neighbours"; ``min(k, C)``
  keeps the range [0, 1] when k > C; ``H = 0`` when ``min(k, C) == 1``);
* adaptive k: start at ``k_min``; while ``H(k) > threshold`` and
  ``k < k_max``, double k, capped at ``k_max``;
* weighted vote ``score_l = sum_{j<=k} w_{y_j} [y_j = l]``, prediction
  ``argmax``; a tie goes to the tied class of the nearest neighbour (the
  paper does not say; the lowest class index would bias every tie towards
  the first class, e.g. 5-5 votes at k = 10), certainty ``1 - H(k)``.

Nothing here touches FAISS: :func:`adaptive_search` takes a ``search(rows,
k)`` callable, asks it only for the rows still undecided at each k, so the
common case (neighbours agree at ``k_min``) costs one small search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``w_c = N / (C * n_c)``; a class with no reference cells gets weight 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    n = counts.sum()
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, n / (n_classes * counts), 0.0)
    return w


def k_schedule(k_min: int, k_max: int) -> list[int]:
    """The ks the adaptive search may visit: k_min, 2 k_min, ... capped at k_max."""
    if k_min < 1 or k_max < k_min:
        raise ValueError(f"need 1 <= k_min <= k_max (got k_min={k_min}, k_max={k_max})")
    ks = [k_min]
    while ks[-1] < k_max:
        ks.append(min(ks[-1] * 2, k_max))
    return ks


def label_counts(neighbor_labels: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """(Q, C) counts of each class among the first ``k`` neighbours (labels < 0 ignored)."""
    lab = np.asarray(neighbor_labels)[:, :k].astype(np.int64)
    q = lab.shape[0]
    valid = lab >= 0
    flat = (lab + n_classes * np.arange(q)[:, None])[valid]
    return np.bincount(flat, minlength=q * n_classes).reshape(q, n_classes)


def normalized_entropy(counts: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """``-sum p log p / log(min(k, C))`` per row of a (Q, C) count matrix."""
    counts = np.asarray(counts, dtype=np.float64)
    tot = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    denom = np.log(min(k, n_classes))
    if denom <= 0:
        return np.zeros(counts.shape[0])
    return np.clip(h / denom, 0.0, 1.0)


def weighted_vote(counts: np.ndarray, weights: np.ndarray | None, neighbor_labels: np.ndarray | None = None) -> np.ndarray:
    """``argmax_l sum_j w_{y_j} [y_j = l]`` = argmax of counts * w.

    Ties go to the tied class whose member is nearest (the first such label in
    ``neighbor_labels``, nearest first); without neighbour labels, to the
    lowest class index.
    """
    scores = counts * (weights[None, :] if weights is not None else 1.0)
    best = np.argmax(scores, axis=1)
    if neighbor_labels is None or scores.shape[0] == 0:
        return best
    top = scores.max(axis=1, keepdims=True)
    tied = np.isclose(scores, top, rtol=1e-12, atol=0.0) & (top > 0)
    several = tied.sum(axis=1) > 1
    if not several.any():
        return best
    lab = np.asarray(neighbor_labels)[several]
    rows = np.arange(lab.shape[0])[:, None]
    is_tied = (lab >= 0) & tied[several][rows, np.clip(lab, 0, None)]
    first = np.argmax(is_tied, axis=1)
    best[several] = lab[np.arange(lab.shape[0]), first]
    return best


@dataclass(frozen=True)
class EWCResult:
    """Per query: predicted class, certainty ``1 - H``, k used, and the neighbours (ids, labels, distances; padded past k)."""

    predicted: np.ndarray  # (Q,)
    certainty: np.ndarray  # (Q,) 1 - H at k_used
    k_used: np.ndarray  # (Q,)
    neighbor_ids: np.ndarray  # (Q, K) -1 padded beyond k_used
    neighbor_labels: np.ndarray  # (Q, K)
    neighbor_distances: np.ndarray  # (Q, K) inf padded


def ewc_decide(
    neighbor_labels: np.ndarray,
    n_classes: int,
    weights: np.ndarray | None,
    k_min: int,
    k_max: int,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adaptive k and vote on a precomputed (Q, >=k_max) neighbour-label matrix.

    Returns ``(predicted, certainty, k_used)``. Rows with fewer than k valid
    neighbours (small index) simply count what is there.
    """
    lab = np.asarray(neighbor_labels)
    q = lab.shape[0]
    pred = np.zeros(q, dtype=np.int64)
    cert = np.zeros(q)
    k_used = np.zeros(q, dtype=np.int64)
    todo = np.arange(q)
    for k in k_schedule(k_min, k_max):
        if todo.size == 0:
            break
        counts = label_counts(lab[todo], k, n_classes)
        h = normalized_entropy(counts, k, n_classes)
        done = (h <= threshold) | (k >= k_max) | (k >= lab.shape[1])
        idx = todo[done]
        pred[idx] = weighted_vote(counts[done], weights, lab[todo[done], :k])
        cert[idx] = 1.0 - h[done]
        k_used[idx] = k
        todo = todo[~done]
    return pred, cert, k_used


def adaptive_search(
    search: SearchFn,
    queries: np.ndarray,
    ref_labels: np.ndarray,
    n_classes: int,
    weights: np.ndarray | None,
    k_min: int,
    k_max: int,
    threshold: float,
) -> EWCResult:
    """EWC over a search function, querying only undecided rows at each k.

    ``search(rows, k)`` returns ``(distances, ids)`` of shape (len(rows), k),
    nearest first, ids -1 where fewer than k references exist. The result is
    identical to :func:`ewc_decide` on a full k_max search (tested).
    """
    q = queries.shape[0]
    n_ref = int(ref_labels.shape[0])
    k_max_eff = max(1, min(k_max, n_ref))
    k_min_eff = min(k_min, k_max_eff)
    pred = np.zeros(q, dtype=np.int64)
    cert = np.zeros(q)
    k_used = np.zeros(q, dtype=np.int64)
    ids_out = np.full((q, k_max_eff), -1, dtype=np.int64)
    lab_out = np.full((q, k_max_eff), -1, dtype=np.int64)
    dist_out = np.full((q, k_max_eff), np.inf, dtype=np.float32)
    todo = np.arange(q)
    for k in k_schedule(k_min_eff, k_max_eff):
        if todo.size == 0:
            break
        d, i = search(queries[todo], k)
        lab = np.where(i >= 0, ref_labels[np.clip(i, 0, None)], -1)
        counts = label_counts(lab, k, n_classes)
        h = normalized_entropy(counts, k, n_classes)
        done = (h <= threshold) | (k >= k_max_eff)
        rows = todo[done]
        pred[rows] = weighted_vote(counts[done], weights, lab[done, :k])
        cert[rows] = 1.0 - h[done]
        k_used[rows] = k
        ids_out[rows, :k] = i[done]
        lab_out[rows, :k] = lab[done]
        dist_out[rows, :k] = d[done]
        todo = todo[~done]
    return EWCResult(pred, cert, k_used, ids_out, lab_out, dist_out)


def macro_accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray | None = None) -> float:
    """Balanced accuracy: mean over the classes present in ``y_true`` of per-class recall."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    classes = np.unique(y_true) if classes is None else classes
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in classes if np.any(y_true == c)]
    return float(np.mean(recalls)) if recalls else 0.0
