"""EWC maths on hand-made neighbour arrays and against a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitor import classify as C


def brute_force_ewc(lab_row: np.ndarray, n_classes: int, weights: np.ndarray | None, k_min: int, k_max: int, thr: float) -> tuple[int, float, int]:
    """Straight from DOMAIN.md section 2, one row, plain Python."""
    k = k_min
    while True:
        labs = [int(x) for x in lab_row[:k]]
        freq = [labs.count(c) / len(labs) for c in range(n_classes)]
        h = -sum(p * math.log(p) for p in freq if p > 0)
        denom = math.log(min(k, n_classes))
        h = h / denom if denom > 0 else 0.0
        if h <= thr or k >= k_max:
            break
        k = min(2 * k, k_max)
    w = weights if weights is not None else np.ones(n_classes)
    scores = [sum(w[c] for x in labs if x == c) for c in range(n_classes)]
    top = max(scores)
    tied = [c for c in range(n_classes) if math.isclose(scores[c], top, rel_tol=1e-12)]
    best = next(x for x in labs if x in tied)  # a tie goes to the nearest tied neighbour
    return best, 1.0 - h, k


def test_class_weights() -> None:
    w = C.class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == [4 / 9, 4 / 3, 0.0]


def test_adaptive_k_stops_early() -> None:
    lab = np.array([[1] * 4 + [0] * 60])
    pred, cert, k = C.ewc_decide(lab, 2, None, 4, 64, 0.3)
    assert (pred[0], cert[0], k[0]) == (1, 1.0, 4)


def test_adaptive_k_runs_to_k_max() -> None:
    lab = np.array([[0, 1] * 32])
    pred, cert, k = C.ewc_decide(lab, 2, None, 2, 40, 0.3)
    assert k[0] == 40 and cert[0] == pytest.approx(0.0)
    assert C.k_schedule(2, 40) == [2, 4, 8, 16, 32, 40]


def test_reweighting_changes_the_winner() -> None:
    ref = np.array([0] * 90 + [1] * 10)
    w = C.class_weights(ref, 2)  # 0.556, 5.0
    lab = np.array([[0, 0, 0, 1, 1]])
    assert C.ewc_decide(lab, 2, None, 5, 5, 0.5)[0][0] == 0
    assert C.ewc_decide(lab, 2, w, 5, 5, 0.5)[0][0] == 1


def test_entropy_normalisation_k_below_and_above_c() -> None:
    # k=2 < C=4: two different labels is maximal disorder for 2 neighbours
    h = C.normalized_entropy(C.label_counts(np.array([[0, 3]]), 2, 4), 2, 4)
    assert h[0] == pytest.approx(1.0)
    # k=8 > C=4: uniform over the 4 classes -> 1; half/half -> log 2 / log 4
    h = C.normalized_entropy(C.label_counts(np.array([[0, 1, 2, 3] * 2, [0, 1] * 4]), 8, 4), 8, 4)
    assert h.tolist() == pytest.approx([1.0, 0.5])
    # k=1: no disorder possible
    assert C.normalized_entropy(np.array([[1, 0]]), 1, 2)[0] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_ewc_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_classes, q, kmax = 5, 200, 64
    # rows of varying purity so every k of the schedule is visited
    purity = rng.random(q)
    major = rng.integers(0, n_classes, q)
    lab = np.where(rng.random((q, kmax)) < purity[:, None], major[:, None], rng.integers(0, n_classes, (q, kmax)))
    w = C.class_weights(rng.integers(0, n_classes, 500), n_classes)
    for weights in (w, None):
        pred, cert, k = C.ewc_decide(lab, n_classes, weights, 4, kmax, 0.4)
        ref = [brute_force_ewc(lab[i], n_classes, weights, 4, kmax, 0.4) for i in range(q)]
        assert pred.tolist() == [r[0] for r in ref]
        assert k.tolist() == [r[2] for r in ref]
        np.testing.assert_allclose(cert, [r[1] for r in ref], atol=1e-12)
    assert len(set(k.tolist())) >= 3


def test_adaptive_search_equals_full_search() -> None:
    rng = np.random.default_rng(5)
    n_ref, n_classes = 400, 4
    refs = rng.normal(size=(n_ref, 8)).astype(np.float32)
    ref_labels = (refs[:, 0] > 0).astype(int) + 2 * (refs[:, 1] > 0.5)
    queries = rng.normal(size=(150, 8)).astype(np.float32)
    calls = []

    def search(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((len(x), k))
        d = ((x[:, None, :] - refs[None]) ** 2).sum(-1)
        i = np.argsort(d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, i, axis=1), i

    w = C.class_weights(ref_labels, n_classes)
    res = C.adaptive_search(search, queries, ref_labels, n_classes, w, 5, 80, 0.35)
    _, full = search(queries, 80)
    pred, cert, k = C.ewc_decide(ref_labels[full], n_classes, w, 5, 80, 0.35)
    assert res.predicted.tolist() == pred.tolist()
    assert res.k_used.tolist() == k.tolist()
    np.testing.assert_allclose(res.certainty, cert)
    # only undecided rows are re-queried
    assert calls[0] == (150, 5) and all(n < 150 for n, _ in calls[1:-1])
    row = int(np.argmax(res.k_used))
    assert res.neighbor_ids[row, : res.k_used[row]].tolist() == full[row, : res.k_used[row]].tolist()


def test_macro_accuracy() -> None:
    assert C.macro_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == 0.5


def test_tie_goes_to_the_nearest_tied_class() -> None:
    counts = np.array([[2, 2, 0], [1, 3, 0], [2, 2, 0]])
    lab = np.array([[1, 0, 0, 1], [0, 1, 1, 1], [0, 1, 1, 0]])
    assert C.weighted_vote(counts, None, lab).tolist() == [1, 1, 0]
    assert C.weighted_vote(counts, None).tolist() == [0, 1, 0]  # without labels: lowest index
    # reweighting can break the tie before the nearest neighbour does
    assert C.weighted_vote(counts, np.array([1.0, 1.5, 1.0]), lab).tolist() == [1, 1, 1]
