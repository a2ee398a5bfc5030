"""Label-free death recipes by grouped cross-validation over the TRAINING experiments of bf_pi_mcf7.

    .venv/bin/python bench/bench_marker_cv.py [--ceiling] [--write bench/results/marker_cv.md]

The run used to choose the documented recipe's settings (``config/mcf7_pi.toml``): the test
experiments of ``bench/bench_marker_truth.py`` (every third experiment by name, offset 1) are never
read. The 37 training fields' nuclei are measured by the ``morphology`` encoder
(:func:`cellmonitor_plugins.encoders.morphology.measure`, on the native masks and pixels), labelled
by the set's PI rule (dead >= 25 background MADs, live <= 3, between not scored), and split into 5
folds by experiment (experiments assigned greedily so that the folds' dead counts balance; never by
field or cell). Each fold's references build a product index (:class:`monitor.index.store.ReferenceIndex`
with the named conditioning) and the product's classifier (:class:`monitor.index.ewc.EWCClassifier`)
calls the held-out fold. Pooled over the 5 folds: balanced accuracy, dead and live recall, the
per-field dead-fraction error, and plain 20-NN in the same space.

Then what the documented recipe calls, out of fold, for every nucleus by the brightness of its
PI (the unscored ones between 3 and 25 MADs too): which dead cells the label-free call misses.

``--ceiling`` adds what flexible learners make of the same measurements on the same folds (a
research row, not a recipe; needs scikit-learn): a class-balanced logistic regression, gradient-
boosted trees and a random forest, each scored by its out-of-fold AUC, its balanced accuracy at
the balanced threshold, and the best balanced accuracy any single threshold reaches on the
pooled held-out folds (optimistic: that threshold is chosen on the answers); a learning curve
(the logistic regression with each fold's references drawn from a share of its training
experiments); and whether a cell's neighbourhood tells more (its neighbours' label-free scores,
and, as a bound no method has, their PI truth).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import emit, need_data  # noqa: E402
from bench.bench_marker_truth import experiment_of, fields, pi_mads, read_field, split  # noqa: E402


class Nuclei(NamedTuple):
    """Every nucleus of the training fields: measurements, PI score (background MADs), field, experiment, centre."""

    x: np.ndarray
    pi: np.ndarray
    stems: list[str]
    exps: list[str]
    centre_um: np.ndarray

    @property
    def scored(self) -> np.ndarray:
        """The set's PI rule leaves the cells between 3 and 25 MADs unscored."""
        return (self.pi >= 25) | (self.pi <= 3)

    @property
    def dead(self) -> np.ndarray:
        return (self.pi >= 25).astype(int)

    def scored_only(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """(features, 1 = dead / 0 = live, field stem, experiment) of the scored nuclei."""
        keep = self.scored
        return self.x[keep], self.dead[keep], [s for s, k in zip(self.stems, keep, strict=True) if k], [e for e, k in zip(self.exps, keep, strict=True) if k]


def nuclei() -> Nuclei:
    """All nuclei of the training fields (scored or not), measured on the brightfield plane."""
    from cellmonitor_plugins.encoders.morphology import measure
    from scipy import ndimage as ndi

    rest, _test = split(fields(), 1)
    feats, pis, stems, exps, centres = [], [], [], [], []
    for stem in rest:
        planes, labels, px = read_field(stem)
        score = pi_mads(planes["dead_nuclei_channel"], labels)
        ids = sorted(score)
        feats.append(measure(planes["brightfield_channel"], labels, ids, px))
        centres.append(np.array(ndi.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2) * px)
        pis += [score[i] for i in ids]
        stems += [stem] * len(ids)
        exps += [experiment_of(stem)] * len(ids)
    return Nuclei(np.concatenate(feats), np.array(pis), stems, exps, np.concatenate(centres))


def folds(y: np.ndarray, exps: list[str], k: int = 5) -> np.ndarray:
    """Fold of each cell: experiments (most dead first) to the fold with the fewest dead so far
    (the product's own grouping, :func:`monitor.index.from_marker.group_folds`)."""
    from monitor.index.from_marker import group_folds

    return group_folds(exps, y, k, 1)


def cross_validate(x: np.ndarray, y: np.ndarray, fold: np.ndarray, conditioning: object, ewc: object,
                   train: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold EWC calls and plain 20-NN calls (1 = dead) through the product's index and classifier;
    with ``train``, only those cells are references (every held-out cell is still called)."""
    from monitor.index.ewc import EWCClassifier
    from monitor.index.store import ReferenceIndex
    from monitor.records import Embeddings

    ewc_calls, knn_calls = np.zeros(len(y), int), np.zeros(len(y), int)
    for j in range(int(fold.max()) + 1):
        tr, te = (fold != j) & (True if train is None else train), fold == j
        index = ReferenceIndex.build(x[tr], y[tr], ("live", "dead"), [{"name": "morphology", "id": "m", "dim": x.shape[1]}],
                                     structure="flat", conditioning=conditioning, ewc=ewc)  # type: ignore[arg-type]
        states = EWCClassifier(index).classify(Embeddings(np.ascontiguousarray(x[te]), ("m",), (x.shape[1],)))
        ewc_calls[te] = states.predicted
        _, nbr = index.search(x[te], 20)
        knn_calls[te] = [int(np.bincount(index.labels[row[row >= 0]], minlength=2).argmax()) for row in nbr]
    return ewc_calls, knn_calls


def scores(y: np.ndarray, p: np.ndarray, stems: list[str]) -> tuple[float, float, float, float]:
    """(balanced accuracy, dead recall, live recall, mean per-field |dead fraction error|)."""
    dead, live = float((p[y == 1] == 1).mean()), float((p[y == 0] == 0).mean())
    st = np.array(stems)
    mae = float(np.mean([abs(p[st == s].mean() - y[st == s].mean()) for s in sorted(set(stems))]))
    return (dead + live) / 2, dead, live, mae


def ceiling(x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> list[str]:
    """Table rows: flexible learners' out-of-fold AUC, balanced accuracy at 0.5 and at the best threshold."""
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import balanced_accuracy_score, roc_auc_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise SystemExit("--ceiling needs scikit-learn: pip install scikit-learn") from None
    learners = {
        "logistic regression, C 0.1, class-balanced (standardised)":
            lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)),
        "gradient-boosted trees, depth 3, 200 rounds at 0.05, class-balanced":
            lambda: HistGradientBoostingClassifier(max_depth=3, learning_rate=0.05, max_iter=200, class_weight="balanced", random_state=0),
        "gradient-boosted trees, library defaults, class-balanced":
            lambda: HistGradientBoostingClassifier(class_weight="balanced", random_state=0),
        "random forest, 500 trees, leaves >= 3, class-balanced":
            lambda: RandomForestClassifier(500, min_samples_leaf=3, class_weight="balanced_subsample", n_jobs=1, random_state=0),
    }
    rows = ["", "What flexible learners make of the same measurements on the same folds (research rows, not recipes):", "",
            "| learner | AUC | BA at 0.5 | best BA over thresholds (optimistic) |", "|---|---|---|---|"]
    for name, make in learners.items():
        p = np.zeros(len(y))
        for j in range(int(fold.max()) + 1):
            tr, te = fold != j, fold == j
            p[te] = make().fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
        best = max(balanced_accuracy_score(y, p >= t) for t in np.quantile(p, np.linspace(0.01, 0.99, 99)))
        rows.append(f"| {name} | {roc_auc_score(y, p):.3f} | {balanced_accuracy_score(y, p >= 0.5):.3f} | {best:.3f} |")
        print(rows[-1], file=sys.stderr)
    return rows


BANDS = ((-np.inf, 3.0, "<= 3 (live)"), (3.0, 25.0, "3-25 (not scored)"), (25.0, 50.0, "25-50 (dead)"),
         (50.0, 100.0, "50-100 (dead)"), (100.0, np.inf, ">= 100 (dead)"))


def all_folds(n: Nuclei) -> np.ndarray:
    """Fold of every nucleus, scored or not: its experiment's fold."""
    _, y, _, exps = n.scored_only()
    of = {e: int(f) for e, f in zip(exps, folds(y, exps), strict=True)}
    return np.array([of[e] for e in n.exps])


def by_marker_strength(n: Nuclei, conditioning: object, ewc: object) -> list[str]:
    """Table rows: how often the documented recipe calls a nucleus dead, by how bright its PI is.
    References are the scored cells of the other folds; every held-out nucleus is called, unscored ones too."""
    fold = all_folds(n)
    calls, _ = cross_validate(n.x, n.dead, fold, conditioning, ewc, train=n.scored)
    rows = ["", "What the documented recipe calls, by the nucleus's PI (out of fold, the same 5 folds; every nucleus of "
            "the training experiments, the unscored ones too):", "",
            "| PI of the nucleus (background MADs above the field) | nuclei | called dead |", "|---|---|---|"]
    for lo, hi, name in BANDS:
        m = (n.pi > lo) & (n.pi <= hi) if hi == 3.0 else (n.pi >= lo) & (n.pi < hi)
        rows.append(f"| {name} | {int(m.sum())} | {calls[m].mean():.2f} |")
    return rows


def logistic_oof(x: np.ndarray, y: np.ndarray, fold: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold probability of a class-balanced logistic regression (C 0.1, standardised): the ceiling's linear learner.
    ``keep[j]``, when given, names the cells fold ``j``'s model may learn from."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = np.zeros(len(y))
    for j in range(int(fold.max()) + 1):
        tr = (fold != j) & (True if keep is None else keep[j])
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=3000))
        p[fold == j] = model.fit(x[tr], y[tr]).predict_proba(x[fold == j])[:, 1]
    return p


def learning_curve(x: np.ndarray, y: np.ndarray, fold: np.ndarray, exps: list[str], draws: int = 5) -> list[str]:
    """Table rows: the logistic's out-of-fold AUC when each fold's references come from a share of its training experiments."""
    from sklearn.metrics import roc_auc_score

    ex = np.array(exps)
    rng = np.random.default_rng(0)
    rows = ["", "Would more experiments of this kind help? The same logistic regression, each fold's references drawn "
            f"from a share of its training experiments ({draws} draws each):", "",
            "| share of the training experiments | experiments per fold (mean) | AUC (mean +- sd) |", "|---|---|---|"]
    for share in (0.25, 0.5, 0.75, 1.0):
        aucs, sizes = [], []
        for _ in range(draws if share < 1 else 1):
            keep = np.zeros((int(fold.max()) + 1, len(y)), bool)
            for j in range(len(keep)):
                pool = sorted(set(ex[fold != j]))
                chosen = rng.choice(pool, max(2, round(share * len(pool))), replace=False)
                keep[j] = np.isin(ex, chosen)
                sizes.append(len(chosen))
            aucs.append(roc_auc_score(y, logistic_oof(x, y, fold, keep)))
        rows.append(f"| {share:.0%} | {np.mean(sizes):.1f} | {np.mean(aucs):.3f} +- {np.std(aucs):.3f} |")
        print(rows[-1], file=sys.stderr)
    return rows


def neighbourhood(n: Nuclei, radius_um: float = 40.0) -> list[str]:
    """Table rows: does a cell's neighbourhood tell more? Label-free (the neighbours' out-of-fold scores) and,
    as an upper bound no method has, the neighbours' own PI truth."""
    from sklearn.metrics import roc_auc_score

    keep = n.scored
    y, fold = n.dead[keep], all_folds(n)[keep]
    p = logistic_oof(n.x[keep], y, fold)
    st, c = np.array(n.stems)[keep], n.centre_um[keep]
    near_p, near_y = np.full(len(y), np.nan), np.full(len(y), np.nan)
    for stem in sorted(set(st)):
        idx = np.flatnonzero(st == stem)
        d = np.linalg.norm(c[idx, None] - c[None, idx], axis=-1)
        for a, i in enumerate(idx):
            w = (d[a] < radius_um) & (d[a] > 0)
            if w.any():
                near_p[i], near_y[i] = p[idx[w]].mean(), y[idx[w]].mean()
    has = ~np.isnan(near_p)
    mixed = p + 0.5 * np.where(has, near_p, p)
    return ["", f"Does the neighbourhood tell more? Scored nuclei within {radius_um:.0f} um in the same field "
            f"({int(has.sum())} of {len(y)} cells have one):", "",
            "| score | AUC |", "|---|---|",
            f"| the cell's own logistic score | {roc_auc_score(y, p):.3f} |",
            f"| its neighbours' mean score (label-free) | {roc_auc_score(y[has], near_p[has]):.3f} |",
            f"| own + 0.5 x neighbours' (label-free) | {roc_auc_score(y, mixed):.3f} |",
            f"| its neighbours' PI truth (an upper bound, not label-free) | {roc_auc_score(y[has], near_y[has]):.3f} |"]


def main() -> int:
    from monitor.index.condition import ConditioningSpec
    from monitor.index.ewc import EWCParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path)
    ap.add_argument("--ceiling", action="store_true", help="add flexible learners on the same folds (needs scikit-learn)")
    args = ap.parse_args()
    need_data()
    t0 = time.perf_counter()
    n = nuclei()
    x, y, stems, exps = n.scored_only()
    fold = folds(y, exps)
    took = time.perf_counter() - t0
    shipped = EWCParams(40, 1000, 0.7, True)
    rows = [
        ("logistic projection, penalty 0.1; EWC k 40.., threshold 0.7 (**the documented recipe**)", ConditioningSpec(1, method="logistic", penalty=0.1), shipped),
        ("logistic projection, penalty 0.01; same EWC", ConditioningSpec(1, method="logistic", penalty=0.01), shipped),
        ("logistic projection, penalty 0.1; EWC k 10.., threshold 0.5 (product defaults)", ConditioningSpec(1, method="logistic", penalty=0.1), EWCParams()),
        ("logistic projection, penalty 0.1; EWC without class reweighting", ConditioningSpec(1, method="logistic", penalty=0.1), EWCParams(40, 1000, 0.7, False)),
        ("PCA-whitened to 32-d (no learned projection); EWC k 40.., 0.7", ConditioningSpec(32, 0.1), shipped),
        ("whitened, all 75 dimensions, no L2; EWC k 40.., 0.7", ConditioningSpec(75, 0.0, l2=False), shipped),
    ]
    lines = [f"Grouped 5-fold CV by experiment over the training experiments of bf_pi_mcf7 ({len(set(exps))} experiments, "
             f"{len(set(stems))} fields, {len(y)} scored nuclei of which {int(y.sum())} PI-dead; test experiments unread). "
             f"Measuring all {len(n.pi)} nuclei (the unscored too): {took:.1f} s ({len(n.pi) / took:.0f} cells/s).", "",
             "| conditioning / EWC | BA | dead recall | live recall | field dead-fraction MAE | plain 20-NN BA |",
             "|---|---|---|---|---|---|"]
    for name, cond, ewc in rows:
        p, knn = cross_validate(x, y, fold, cond, ewc)
        ba, dead, live, mae = scores(y, p, stems)
        lines.append(f"| {name} | {ba:.3f} | {dead:.3f} | {live:.3f} | {mae:.3f} | {scores(y, knn, stems)[0]:.3f} |")
        print(lines[-1], file=sys.stderr)
    lines += by_marker_strength(n, rows[0][1], rows[0][2])
    if args.ceiling:
        lines += ceiling(x, y, fold) + learning_curve(x, y, fold, exps) + neighbourhood(n)
    emit(lines, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
