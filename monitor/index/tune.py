"""The paper's combination search: every non-empty subset of cached encoders x a small grid.

For each subset and each feature conditioning (raw vectors, or
standardise + PCA-whiten to each of ``condition_dims`` + L2, fitted on the
training rows only: :mod:`monitor.index.condition`) the training vectors
are concatenated in encoder order and indexed once (exact search, the chosen metric); one k_max search of the
validation cells gives a neighbour-label matrix on which every grid point
(k range x entropy threshold x reweighting) is decided with
:func:`monitor.classify.ewc_decide` -- identical to the adaptive search, at
the cost of one search per subset. The plain k-NN baseline of each subset is
scored in the same pass. Rows are ranked by validation macro accuracy, ties
broken towards fewer encoders, then smaller mean k.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monitor import classify
from monitor.index.cache import EmbeddedSet
from monitor.index.condition import ConditioningSpec
from monitor.index.presets import encoders_toml, parse_encoder
from monitor.index.search import Metric
from monitor.index.store import ReferenceIndex

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
DEFAULT_K_RANGES = ((10, 1000), (20, 1000), (10, 100))
#: conditioning dims tried by default (0: raw vectors)
DEFAULT_CONDITION_DIMS = (0, 128, 192, 256)


@dataclass(frozen=True)
class SearchRow:
    """One evaluated configuration (``method`` is ``"EWC"`` or ``"plain k-NN"``)."""

    encoders: tuple[str, ...]
    method: str
    k_min: int
    k_max: int
    threshold: float
    reweight: bool
    macro_accuracy: float
    mean_k: float
    condition_dim: int = 0  # 0: raw vectors
    shrinkage: float = 0.0


def power_set(items: Sequence[str]) -> list[tuple[str, ...]]:
    """All non-empty subsets, in input order within each subset."""
    return [c for r in range(1, len(items) + 1) for c in itertools.combinations(items, r)]


def combination_search(
    emb: EmbeddedSet,
    encoder_ids: Sequence[str],
    train: np.ndarray,
    val: np.ndarray,
    metric: Metric = "l2",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    k_ranges: Sequence[tuple[int, int]] = DEFAULT_K_RANGES,
    reweight: Sequence[bool] = (True, False),
    baseline_k: int = 20,
    dims: dict[str, int] | None = None,
    condition_dims: Sequence[int] = (0,),
    shrinkage: float = 0.1,
) -> list[SearchRow]:
    """Rank every subset x conditioning x grid point on the validation rows (best first).

    The conditioning is fitted on the ``train`` rows only; ``val`` rows are
    only ever queries.
    """
    y_val = emb.labels[val]
    n_classes = len(emb.classes)
    rows: list[SearchRow] = []
    for subset, cdim in itertools.product(power_set(list(encoder_ids)), condition_dims):
        xt = emb.concat(subset)[train]
        xv = emb.concat(subset)[val]
        encs = [{"name": e, "id": e, "dim": (dims or {}).get(e, emb.vectors[e].shape[1])} for e in subset]
        cond = ConditioningSpec(cdim, shrinkage) if cdim > 0 else None
        index = ReferenceIndex.build(xt, emb.labels[train], emb.classes, encs, metric=metric, structure="flat", conditioning=cond)
        cd, sh = (index.conditioner.dim, shrinkage) if index.conditioner is not None else (0, 0.0)
        k_top = min(max([km for _, km in k_ranges] + [baseline_k]), len(index))
        _, ids = index.search(xv, k_top)
        lab = np.where(ids >= 0, index.labels[np.clip(ids, 0, None)], -1)
        kb = min(baseline_k, k_top)
        base = classify.weighted_vote(classify.label_counts(lab, kb, n_classes), None, lab[:, :kb])
        rows.append(SearchRow(subset, "plain k-NN", kb, kb, float("nan"), False, classify.macro_accuracy(y_val, base), float(kb), cd, sh))
        for (k_min, k_max), thr, rw in itertools.product(k_ranges, thresholds, reweight):
            pred, _, k_used = classify.ewc_decide(lab, n_classes, index.weights if rw else None, min(k_min, k_top), min(k_max, k_top), thr)
            rows.append(SearchRow(subset, "EWC", k_min, k_max, thr, rw, classify.macro_accuracy(y_val, pred), float(k_used.mean()), cd, sh))
        log.info("searched %s, conditioning %s", "+".join(subset), cd or "raw")
    rows.sort(key=lambda r: (-r.macro_accuracy, len(r.encoders), r.mean_k, r.condition_dim))
    return rows


def best_ewc(rows: Sequence[SearchRow]) -> SearchRow:
    """The best EWC row (the search's winner)."""
    return next(r for r in rows if r.method == "EWC")


def winner_toml(row: SearchRow, encoder_names: dict[str, str], n_configs: int, metric: str) -> str:
    """A TOML snippet for the service config (``[[encoders]]`` + ``[classifier]``).

    ``encoder_names`` maps encoder id to the ``--encoders`` spec
    (``name[:key=value...]``) the command line and the config use.
    """

    specs = [encoder_names.get(e, e) for e in row.encoders]
    lines = [
        f"# cellmonitor index search: best of {n_configs} configurations on the validation split",
        f"# validation macro accuracy {row.macro_accuracy:.4f}, mean k {row.mean_k:.1f}, metric {metric}",
        "# build the index with: cellmonitor index build DATA --encoders "
        + ",".join(specs)
        + f" --condition-dim {row.condition_dim}"
        + (f" --shrinkage {row.shrinkage:g}" if row.condition_dim else "")
        + f" --metric {metric} --k-min {row.k_min} --k-max {row.k_max} --threshold {row.threshold:g}"
        + ("" if row.reweight else " --no-reweight"),
    ]
    lines.append(encoders_toml([parse_encoder(s) for s in specs]))
    lines += [
        "[classifier]",
        f"k_min = {row.k_min}",
        f"k_max = {row.k_max}",
        f"entropy_threshold = {row.threshold:g}",
        f"reweight = {'true' if row.reweight else 'false'}",
        "",
    ]
    return "\n".join(lines)
