"""The death marker: measured in each cell's mask against the background noise, labelled by ordered rules."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.marker import AMBIGUOUS, MarkerCheck, MarkerRules, Rule, label_cells, measure, resolve
from monitor.records import Cell, Cells, Frame, FrameKey, States


def _frame_and_cells(signals: list[float], noise: float = 2.0, background: float = 100.0) -> tuple[Frame, Cells]:
    rng = np.random.default_rng(0)
    size = 40 * len(signals) + 40
    marker = background + rng.normal(0, noise, (60, size))
    labels = np.zeros((60, size), np.int32)
    cells = []
    for i, s in enumerate(signals):
        x0 = 20 + 40 * i
        labels[20:40, x0 : x0 + 20] = i + 1
        marker[20:40, x0 : x0 + 20] += s
        cells.append(Cell(i + 1, (30.0, x0 + 10.0), 40.0, (20, x0, 40, x0 + 20)))
    frame = Frame(FrameKey("e", "A1", "1", 0), {"phase": np.zeros_like(marker), "pi": marker}, "phase", None, 0.5, "config", "x")
    return frame, Cells(labels, tuple(cells), 0.5)


def test_measure_is_background_corrected_in_noise_units() -> None:
    frame, cells = _frame_and_cells([0.0, 20.0, 100.0], noise=2.0)
    v = measure(frame, cells, "pi")
    assert v[0] == pytest.approx(0.0, abs=0.5)
    assert v[1] == pytest.approx(10.0, rel=0.1)  # 20 counts over a noise of 2
    assert v[2] == pytest.approx(50.0, rel=0.1)
    # gain does not matter: the same frame at twice the exposure gives the same values
    frame2 = Frame(frame.key, {**frame.channels, "pi": frame.channels["pi"] * 2}, "phase", None, 0.5, "config", "x")
    assert np.allclose(measure(frame2, cells, "pi"), v, rtol=1e-6)


RULES = MarkerRules((Rule("pi", "dead", 40.0), Rule("apo", "apoptotic", 10.0)), negative="live", margin=0.25)


def test_rules_first_match_margin_and_negative() -> None:
    pi = np.array([100.0, 45.0, 1.0, 1.0, 1.0, 60.0, np.nan])
    apo = np.array([50.0, 0.0, 20.0, 11.0, 0.0, 0.0, 0.0])
    got = list(label_cells({"pi": pi, "apo": apo}, RULES))
    # dead (first rule) / within 40 +- 10: ambiguous / apoptotic / within 10 +- 2.5: ambiguous / live / dead / no signal: ambiguous
    assert got == ["dead", AMBIGUOUS, "apoptotic", AMBIGUOUS, "live", "dead", AMBIGUOUS]


def test_otsu_thresholds_are_fitted_on_the_cells_and_required_only_at_build() -> None:
    values = {"apo": np.r_[np.full(20, 1.0), np.full(10, 30.0)]}
    table = {"rules": [{"channel": "apo", "state": "apoptotic", "threshold": "otsu"}], "negative": "live", "margin": 0.1}
    rules = resolve(table, values)
    assert 1.0 < rules.rules[0].threshold < 30.0
    assert list(label_cells(values, rules)) == ["live"] * 20 + ["apoptotic"] * 10
    with pytest.raises(ValueError, match="index build --from-marker"):
        resolve(table)


def test_agreement_counts_labelled_cells_the_classifier_calls_the_same() -> None:
    frame, cells = _frame_and_cells([0.0, 200.0, 200.0, 80.0])  # live, dead, dead, ambiguous (40 +- 10 x noise)
    rules = MarkerRules((Rule("pi", "dead", 40.0),), margin=0.25)
    classes = ("Alive", "Dead")
    n = 4
    states = States(classes, np.array([0, 1, 0, 1]), np.ones(n), np.ones(n, int), np.zeros(n, bool),
                    np.zeros((n, 1), np.int64), np.zeros((n, 1), np.int64), np.zeros((n, 1), np.float32))
    m = MarkerCheck(rules, {"Alive": "live", "Dead": "dead"}).agreement(frame, cells, states)
    assert m is not None and (m.n_labelled, m.n_agree, m.n_ambiguous) == (3, 2, 1)
    assert m.fraction == pytest.approx(2 / 3)
    # a frame without the marker channel: no verdict
    bare = Frame(frame.key, {"phase": frame.channels["phase"]}, "phase", None, 0.5, "config", "x")
    assert MarkerCheck(rules, {}).agreement(bare, cells, states) is None


def test_otsu_is_fitted_on_the_cells_earlier_rules_left() -> None:
    # dead cells are bright in both channels; apoptotic only in apo; live in neither
    pi = np.r_[np.full(30, 100.0), np.zeros(20), np.zeros(60)]
    apo = np.r_[np.full(30, 200.0), np.full(20, 30.0), np.zeros(60)]
    table = {"rules": [{"channel": "pi", "state": "dead", "threshold": 40.0},
                       {"channel": "apo", "state": "apoptotic", "threshold": "otsu"}], "negative": "live", "margin": 0.1}
    rules = resolve(table, {"pi": pi, "apo": apo})
    assert 0.0 < rules.rules[1].threshold < 30.0  # split between live and apoptotic, not between apoptotic and dead
    got = list(label_cells({"pi": pi, "apo": apo}, rules))
    assert got == ["dead"] * 30 + ["apoptotic"] * 20 + ["live"] * 60


def test_a_published_rule_with_an_explicit_band_in_mads_outside_every_mask() -> None:
    """"Dead at >= 25 background MADs above the background median, live at <= 3, between not scored":
    ``noise = "mad"``, ``ring_um = 0``, ``ambiguous_above = 3``."""
    frame, cells = _frame_and_cells([0.0, 10.0, 40.0, 60.0], noise=2.0)
    sigma = measure(frame, cells, "pi")
    mad = measure(frame, cells, "pi", ring_um=0.0, noise="mad")
    assert mad == pytest.approx(sigma * 1.4826, rel=0.05, abs=0.1)  # MADs are 1.4826 x more numerous than sigmas
    rules = resolve({"rules": [{"channel": "pi", "state": "dead", "threshold": 25.0, "ambiguous_above": 3.0}],
                     "negative": "live", "ring_um": 0.0, "noise": "mad"})
    assert rules.record()["rules"][0]["ambiguous_above"] == 3.0 and rules.noise == "mad"
    got = list(label_cells({"pi": np.array([2.9, 3.0, 3.1, 24.9, 25.0, 80.0])}, rules))
    assert got == ["live", "live", AMBIGUOUS, AMBIGUOUS, "dead", "dead"]
    labels = list(MarkerCheck(rules, {}).verdicts(frame, cells)[1])
    assert labels[0] == "live" and labels[-1] == "dead"
