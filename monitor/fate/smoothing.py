"""One-way state smoothing along a track: a hidden-Markov model in which cells only die.

The classifier calls each frame alone, so a cell can be "dead" at 10:00 and
"live" at 11:00. Cell death is irreversible; this model says so.

Policy
------
* Hidden states, in this order: ``live``, ``apoptotic``, ``dead``, ``necrotic``.
  Allowed moves, as rates per hour (a continuous-time generator ``Q``):
  live -> apoptotic (``apoptosis_per_h``), apoptotic -> dead (``death_per_h``),
  live -> necrotic (``necrosis_per_h``). Dead and necrotic are absorbing; nothing
  moves backwards. Between two observations ``dt`` hours apart the transition
  matrix is ``expm(Q dt)``, so uneven intervals and gaps are handled, and a
  cell may pass through apoptosis unseen between two frames.
* Emissions from the classifier's certainty ``c`` (``1 - H``, in [0, 1]): the
  call is right with probability ``w = 1/K + (accuracy - 1/K) c`` and
  otherwise names one of the other ``K - 1`` states evenly. So a call with no
  certainty carries no information, and even a certain call is wrong with
  probability ``1 - accuracy``. Calls of ``other`` or unknown cells carry none.
* The path is the Viterbi path (the most likely one-way sequence); the
  posteriors (forward-backward) give each state's probability per frame.
* Onset of apoptosis: the first time on the path in ``apoptotic`` (or, if the
  cell went from live to dead between two frames, the time of death). Time of
  death: the first time on the path in ``dead`` or ``necrotic``. A track that
  ends alive has neither (it is censored there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: the hidden states, in the model's order
STATES = ("live", "apoptotic", "dead", "necrotic")
_IDX = {s: i for i, s in enumerate(STATES)}
#: states that end a cell's life
DEATH_STATES = frozenset({"dead", "necrotic"})


@dataclass(frozen=True)
class HMMParams:
    """Transition rates per hour, the classifier's accuracy at full certainty and the
    starting probabilities (live, apoptotic, dead, necrotic)."""

    apoptosis_per_h: float = 0.05
    death_per_h: float = 0.3
    necrosis_per_h: float = 0.01
    accuracy: float = 0.85
    start: tuple[float, float, float, float] = (0.85, 0.05, 0.05, 0.05)

    def generator(self) -> np.ndarray:
        """The rate matrix ``Q`` (rows sum to 0), per hour."""
        q = np.zeros((4, 4))
        q[0, 1] = self.apoptosis_per_h
        q[0, 3] = self.necrosis_per_h
        q[1, 2] = self.death_per_h
        q[np.diag_indices(4)] = -q.sum(axis=1)
        return q


@dataclass(frozen=True)
class Smoothed:
    """One track's smoothed states: the Viterbi path (state names), the posterior
    probabilities (n, 4) in :data:`STATES` order, and the two times (NaN if never)."""

    path: tuple[str, ...]
    posterior: np.ndarray
    onset_apoptosis_h: float
    death_h: float


def transition(params: HMMParams, dt_h: float) -> np.ndarray:
    """``expm(Q dt)``: the probability of each move over ``dt_h`` hours."""
    from scipy.linalg import expm

    return np.clip(expm(params.generator() * max(float(dt_h), 0.0)), 0.0, 1.0)


def emissions(states: Sequence[str], certainty: Sequence[float], params: HMMParams,
              unknown: Sequence[bool] | None = None) -> np.ndarray:
    """``P(call | hidden state)`` per frame, shape (n, 4) (module docstring)."""
    k = len(STATES)
    n = len(states)
    e = np.full((n, k), 1.0)
    for i, (s, c) in enumerate(zip(states, certainty, strict=True)):
        j = _IDX.get(str(s))
        if j is None or (unknown is not None and bool(unknown[i])):
            continue
        c = float(c) if np.isfinite(c) else 0.0
        w = 1.0 / k + (params.accuracy - 1.0 / k) * min(max(c, 0.0), 1.0)
        e[i, :] = (1.0 - w) / (k - 1)
        e[i, j] = w
    return e


def smooth_track(times_h: Sequence[float], states: Sequence[str], certainty: Sequence[float],
                 params: HMMParams | None = None, unknown: Sequence[bool] | None = None) -> Smoothed:
    """Smooth one track's calls (in time order) with the one-way model (module docstring)."""
    p = params or HMMParams()
    t = np.asarray(times_h, dtype=float)
    n = len(t)
    if n == 0:
        return Smoothed((), np.zeros((0, 4)), float("nan"), float("nan"))
    if np.any(np.diff(t) < 0):
        raise ValueError("a track's times must be in order")
    e = emissions(states, certainty, p, unknown)
    start = np.asarray(p.start, dtype=float)
    start = start / start.sum()
    trans = [transition(p, t[i] - t[i - 1]) for i in range(1, n)]
    with np.errstate(divide="ignore"):
        loge = np.log(e)
        logs = np.log(start)
        logt = [np.log(m) for m in trans]
    # Viterbi
    v = logs + loge[0]
    back = np.zeros((n, 4), dtype=np.int64)
    for i in range(1, n):
        cand = v[:, None] + logt[i - 1]
        back[i] = np.argmax(cand, axis=0)
        v = cand[back[i], np.arange(4)] + loge[i]
    path = np.zeros(n, dtype=np.int64)
    path[-1] = int(np.argmax(v))
    for i in range(n - 1, 0, -1):
        path[i - 1] = back[i, path[i]]
    # forward-backward (scaled)
    alpha = np.zeros((n, 4))
    a = start * e[0]
    alpha[0] = a / a.sum()
    for i in range(1, n):
        a = (alpha[i - 1] @ trans[i - 1]) * e[i]
        alpha[i] = a / a.sum()
    beta = np.ones((n, 4))
    for i in range(n - 2, -1, -1):
        b = trans[i] @ (e[i + 1] * beta[i + 1])
        beta[i] = b / b.sum()
    post = alpha * beta
    post /= post.sum(axis=1, keepdims=True)
    names = tuple(STATES[int(j)] for j in path)
    death = next((t[i] for i, s in enumerate(names) if s in DEATH_STATES), float("nan"))
    onset = next((t[i] for i, s in enumerate(names) if s in ("apoptotic", "dead")), float("nan"))
    return Smoothed(names, post, float(onset), float(death))
