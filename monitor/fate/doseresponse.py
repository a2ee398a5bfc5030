"""Dose response: a four-parameter logistic fit of a dying fraction against concentration.

Model (increasing with dose; the control wells, concentration 0, sit at ``bottom``)::

    y(x) = bottom + (top - bottom) / (1 + (EC50 / x) ** hill)

Policy
------
* Fitted by least squares (scipy ``curve_fit``) in ``log10 EC50``, with
  ``bottom``/``top`` in [0, 1] and ``hill`` in [0.1, 10]. The 95% interval of
  EC50 is the Wald interval on ``log10 EC50`` (so it is asymmetric in EC50).
* A fit is never dropped silently: each one is returned with ``ok`` and, when
  not ok, its reason: fewer than 4 distinct concentrations (controls count as
  one), no response (the fraction spans less than ``min_span``), the solver
  did not converge, EC50 outside the tested range, or an interval the data
  cannot bound. A fit with a reason keeps its numbers where it has them, for a
  person to judge; tables and the report print the reason beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DoseFit:
    """One fit: the four parameters, EC50's 95% interval, and whether it is usable."""

    ec50: float
    ec50_low: float
    ec50_high: float
    hill: float
    bottom: float
    top: float
    n_points: int
    ok: bool
    reason: str = ""


def logistic4(x: np.ndarray, bottom: float, top: float, log_ec50: float, hill: float) -> np.ndarray:
    """The model above, with ``log10 EC50``; ``x = 0`` gives ``bottom``."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        r = np.where(x > 0, (10.0 ** log_ec50) / np.where(x > 0, x, 1.0), np.inf)
        return bottom + (top - bottom) / (1.0 + r ** hill)


def _failed(reason: str, n: int) -> DoseFit:
    nan = float("nan")
    return DoseFit(nan, nan, nan, nan, nan, nan, n, False, reason)


def fit_dose_response(concentration: Sequence[float], fraction: Sequence[float],
                      weights: Sequence[float] | None = None, min_span: float = 0.1) -> DoseFit:
    """Fit the model to per-well fractions (one point per well; NaN fractions left out)."""
    from scipy.optimize import curve_fit

    x = np.asarray(concentration, dtype=float)
    y = np.asarray(fraction, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x >= 0)
    x, y = x[keep], y[keep]
    w = None if weights is None else np.asarray(weights, dtype=float)[keep]
    n = len(x)
    doses = np.unique(x)
    if len(doses) < 4:
        return _failed(f"too few concentrations ({len(doses)}; need 4 or more)", n)
    if float(y.max() - y.min()) < min_span:
        return _failed(f"no response (the fraction spans {y.max() - y.min():.2f} < {min_span})", n)
    pos = doses[doses > 0]
    lo_x, hi_x = float(pos.min()), float(pos.max())
    sigma = None if w is None else 1.0 / np.sqrt(np.clip(w, 1e-9, None))
    p0 = [float(np.clip(y[x == doses[0]].mean(), 0, 1)), float(np.clip(y[x == doses[-1]].mean(), 0, 1)),
          float(np.log10(np.sqrt(lo_x * hi_x))), 1.0]
    bounds = ([0.0, 0.0, np.log10(lo_x) - 3, 0.1], [1.0, 1.0, np.log10(hi_x) + 3, 10.0])
    import warnings

    from scipy.optimize import OptimizeWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # an unbounded interval is reported as a reason below
            popt, pcov = curve_fit(logistic4, x, y, p0=p0, sigma=sigma, bounds=bounds, maxfev=5000)
    except (RuntimeError, ValueError) as e:
        return _failed(f"did not converge ({e})", n)
    bottom, top, log_ec50, hill = (float(v) for v in popt)
    ec50 = 10.0 ** log_ec50
    se = float(np.sqrt(pcov[2, 2])) if np.all(np.isfinite(pcov)) and pcov[2, 2] >= 0 else float("inf")
    if not np.isfinite(se) or se > 10.0:
        se = float("inf")
    low, high = (10.0 ** (log_ec50 - 1.96 * se), 10.0 ** (log_ec50 + 1.96 * se)) if np.isfinite(se) else (float("nan"),) * 2
    reason = ""
    if top - bottom < min_span:
        reason = f"no response (the fitted curve rises {top - bottom:.2f} < {min_span})"
    elif not lo_x <= ec50 <= hi_x:
        reason = f"EC50 {ec50:.3g} is outside the tested range {lo_x:.3g}..{hi_x:.3g}"
    elif not np.isfinite(se) or se > 1.0:
        reason = "the data cannot bound EC50 (its interval spans more than 100-fold)"
    return DoseFit(ec50, low, high, hill, bottom, top, n, not reason, reason)
