"""Evaluate an index on labelled cells: EWC-FAISS and, in the same run, plain k-NN.

Macro accuracy is balanced accuracy: the mean over the classes present in the
evaluated data of per-class recall. A true class that the index does not know
(transfer sets) can never be predicted, so its cells count as wrong; a
prediction of an index class absent from the data counts as wrong too.

The baseline is plain k-NN: a fixed ``k``, an unweighted majority vote (ties
to the lower class index), no adaptation; it uses the same search as EWC, so
the difference between the two rows is what the entropy-adaptive k and the
class weights add.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor import classify
from monitor.index.ewc import EWCClassifier, EWCParams
from monitor.index.store import ReferenceIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scores:
    """Accuracy of one method on one evaluation set.

    ``confusion[i, j]`` counts cells of true class ``true_classes[i]``
    predicted as ``pred_classes[j]``.
    """

    method: str
    macro_accuracy: float
    accuracy: float
    per_class: dict[str, float]
    confusion: np.ndarray
    true_classes: tuple[str, ...]
    pred_classes: tuple[str, ...]
    mean_k: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``index evaluate --json``)."""
        return {
            "method": self.method,
            "macro_accuracy": self.macro_accuracy,
            "accuracy": self.accuracy,
            "per_class": self.per_class,
            "confusion": {"true": list(self.true_classes), "predicted": list(self.pred_classes), "counts": self.confusion.tolist()},
            "mean_k": self.mean_k,
            "n": self.n,
        }


def plain_knn(index: ReferenceIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Baseline prediction: unweighted majority of the ``k`` nearest labels (ties to the nearest tied class)."""
    _, ids = index.search(queries, k)
    lab = np.where(ids >= 0, index.labels[np.clip(ids, 0, None)], -1)
    counts = classify.label_counts(lab, ids.shape[1], len(index.classes))
    return classify.weighted_vote(counts, None, lab)


def score(method: str, y_true_names: Sequence[str], pred: np.ndarray, index_classes: Sequence[str], k_used: np.ndarray | None = None) -> Scores:
    """Scores of predictions (indices into ``index_classes``) against true class names."""
    y_names = list(y_true_names)
    true_classes = tuple(sorted(set(y_names), key=lambda c: (c not in index_classes, list(index_classes).index(c) if c in index_classes else 0, c)))
    t_idx = np.array([true_classes.index(c) for c in y_names], dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    conf = np.zeros((len(true_classes), len(index_classes)), dtype=np.int64)
    np.add.at(conf, (t_idx, pred), 1)
    correct = np.array([index_classes[p] == y for p, y in zip(pred, y_names, strict=True)])
    per_class = {c: float(correct[t_idx == i].mean()) for i, c in enumerate(true_classes)}
    return Scores(
        method=method,
        macro_accuracy=float(np.mean(list(per_class.values()))) if per_class else 0.0,
        accuracy=float(correct.mean()) if len(correct) else 0.0,
        per_class=per_class,
        confusion=conf,
        true_classes=true_classes,
        pred_classes=tuple(index_classes),
        mean_k=float(np.mean(k_used)) if k_used is not None and len(k_used) else float("nan"),
        n=len(y_names),
    )


@dataclass(frozen=True)
class Evaluation:
    """EWC and baseline scores of one run, with the parameters used."""

    ewc: Scores
    baseline: Scores
    params: EWCParams
    baseline_k: int

    def to_dict(self) -> dict[str, Any]:
        return {"ewc": self.ewc.to_dict(), "baseline": self.baseline.to_dict(), "params": vars(self.params), "baseline_k": self.baseline_k}


def evaluate(index: ReferenceIndex, vectors: np.ndarray, y_true_names: Sequence[str], params: EWCParams | None = None, baseline_k: int | None = None) -> Evaluation:
    """Classify ``vectors`` with EWC (``params`` or the index's) and with plain k-NN.

    ``baseline_k`` defaults to 20 (the issue's calibration), capped at the
    index size.
    """
    p = params or index.ewc
    states = EWCClassifier(index, p).classify(np.asarray(vectors, dtype=np.float32))
    ewc = score("EWC", y_true_names, states.predicted, index.classes, states.k_used)
    k = min(baseline_k or 20, len(index))
    base_pred = plain_knn(index, vectors, k)
    base = score(f"plain {k}-NN", y_true_names, base_pred, index.classes, np.full(len(base_pred), k))
    return Evaluation(ewc, base, p, k)
