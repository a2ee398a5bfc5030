"""Survival: Kaplan-Meier curves, median time to death and the log-rank test (numpy/scipy).

Policy
------
* Each track is one subject: its time is the time of death (an event) or,
  for a track that ends alive, the last time it was seen (censored there).
* Kaplan-Meier estimate with Greenwood's variance; the pointwise 95% interval
  is the log(-log) (exponential Greenwood) one, which stays inside [0, 1].
* Median time to death: the first time the curve is at or below 0.5; its
  interval is where the interval's bounds cross 0.5 (Brookmeyer-Crowley style,
  read off the pointwise bands). Not reached: NaN, and said so by the caller.
* Log-rank test of a group against the pooled control wells: the chi-square
  statistic with one degree of freedom and its p-value.
* The curve, its band and the test agree with scipy's ``stats.ecdf`` (log-log
  interval) and ``stats.logrank`` (tested); kept here as plain numpy so the
  median's interval and the per-well tables need nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KMCurve:
    """A Kaplan-Meier curve: survival just after each event time, with its 95% band."""

    times_h: np.ndarray
    survival: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    at_risk: np.ndarray
    n: int
    events: int


@dataclass(frozen=True)
class Median:
    """Median time to death with its 95% interval (NaN where the curve never reaches 0.5)."""

    median_h: float
    lower_h: float
    upper_h: float


def kaplan_meier(times_h: Sequence[float], died: Sequence[bool], z: float = 1.959964) -> KMCurve:
    """The Kaplan-Meier curve of subjects followed for ``times_h`` (died or censored)."""
    t = np.asarray(times_h, dtype=float)
    d = np.asarray(died, dtype=bool)
    if t.shape != d.shape:
        raise ValueError("times and events differ in length")
    ev_times = np.unique(t[d])
    s = 1.0
    gw = 0.0
    out_s, out_lo, out_hi, out_n = [1.0], [1.0], [1.0], [len(t)]
    for u in ev_times:
        n_at = int(np.sum(t >= u))
        k = int(np.sum((t == u) & d))
        s *= 1.0 - k / n_at
        if n_at > k:
            gw += k / (n_at * (n_at - k))
        if 0.0 < s < 1.0 and np.isfinite(gw):
            # log(-log) interval: V = gw / log(s)^2
            se = np.sqrt(gw) / abs(np.log(s))
            lo = s ** np.exp(z * se)
            hi = s ** np.exp(-z * se)
        else:
            lo, hi = (s, s) if s >= 1.0 else (0.0, 0.0) if s <= 0 else (s, s)
        out_s.append(s)
        out_lo.append(float(lo))
        out_hi.append(float(hi))
        out_n.append(n_at)
    return KMCurve(np.concatenate([[0.0], ev_times]), np.array(out_s), np.array(out_lo), np.array(out_hi),
                   np.array(out_n), len(t), int(d.sum()))


def _first_at_or_below(times: np.ndarray, values: np.ndarray, level: float) -> float:
    hit = np.nonzero(values <= level)[0]
    return float(times[hit[0]]) if len(hit) else float("nan")


def median_time(curve: KMCurve) -> Median:
    """The median time to death and its 95% interval (module docstring)."""
    return Median(_first_at_or_below(curve.times_h, curve.survival, 0.5),
                  _first_at_or_below(curve.times_h, curve.lower, 0.5),
                  _first_at_or_below(curve.times_h, curve.upper, 0.5))


@dataclass(frozen=True)
class LogRank:
    """The log-rank test of one group against another: chi-square (1 d.f.) and p."""

    chi2: float
    p_value: float
    observed: float
    expected: float


def log_rank(times_a: Sequence[float], died_a: Sequence[bool], times_b: Sequence[float], died_b: Sequence[bool]) -> LogRank:
    """Mantel's log-rank test of group a against group b (observed and expected deaths are
    group a's)."""
    from scipy.stats import chi2

    ta, da = np.asarray(times_a, float), np.asarray(died_a, bool)
    tb, db = np.asarray(times_b, float), np.asarray(died_b, bool)
    ev = np.unique(np.concatenate([ta[da], tb[db]]))
    o = e = v = 0.0
    for u in ev:
        na, nb = np.sum(ta >= u), np.sum(tb >= u)
        ka, kb = np.sum((ta == u) & da), np.sum((tb == u) & db)
        n, k = na + nb, ka + kb
        if n == 0:
            continue
        o += ka
        e += k * na / n
        if n > 1:
            v += k * (na / n) * (nb / n) * (n - k) / (n - 1)
    if v <= 0:
        return LogRank(float("nan"), float("nan"), float(o), float(e))
    stat = (o - e) ** 2 / v
    return LogRank(float(stat), float(chi2.sf(stat, 1)), float(o), float(e))
