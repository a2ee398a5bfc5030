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
  probability ``1 - accuracy``. Calls of ``other`` carry none; an unknown cell's call
  (far from every reference: an odd frame, or a cell unlike the references) counts
  with ``unknown_weight`` of its certainty, so a run of them still moves a track while
  one odd frame does not.
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
from functools import lru_cache

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
    #: an unknown cell's call counts with this share of its certainty (0: not at all)
    unknown_weight: float = 0.5

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
    """``expm(Q dt)``: the probability of each move over ``dt_h`` hours (cached: a time-lapse
    has few distinct intervals)."""
    return _transition(params, round(max(float(dt_h), 0.0), 9))


@lru_cache(maxsize=4096)
def _transition(params: HMMParams, dt_h: float) -> np.ndarray:
    from scipy.linalg import expm

    m = np.clip(expm(params.generator() * dt_h), 0.0, 1.0)
    m.flags.writeable = False
    return m


def emissions(states: Sequence[str], certainty: Sequence[float], params: HMMParams,
              unknown: Sequence[bool] | None = None) -> np.ndarray:
    """``P(call | hidden state)`` per frame, shape (n, 4) (module docstring)."""
    k = len(STATES)
    n = len(states)
    e = np.full((n, k), 1.0)
    for i, (s, c) in enumerate(zip(states, certainty, strict=True)):
        j = _IDX.get(str(s))
        if j is None:
            continue
        c = float(c) if np.isfinite(c) else 0.0
        if unknown is not None and bool(unknown[i]):
            c *= params.unknown_weight
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


@dataclass(frozen=True)
class FieldSmoothed:
    """Every track of a field at once: Viterbi paths as state indices (n_tracks, n_times; -1
    outside a track's span), posteriors (n_tracks, n_times, 4; NaN outside), and each track's
    onset of apoptosis and time of death in hours (NaN: never)."""

    path: np.ndarray
    posterior: np.ndarray
    onset_apoptosis_h: np.ndarray
    death_h: np.ndarray


def smooth_field(times_h: np.ndarray, calls: np.ndarray, certainty: np.ndarray, present: np.ndarray,
                 params: HMMParams | None = None, unknown: np.ndarray | None = None) -> FieldSmoothed:
    """The same model as :func:`smooth_track`, for all tracks of a field on the field's
    timeline at once (numpy over tracks, a loop over timepoints only); the result equals
    :func:`smooth_track` on each track (tested).

    ``present`` (n_tracks, n_times): the track has a row at that timepoint; ``calls``: the
    row's call as an index into :data:`STATES` (``-1``: a call of another class, which
    carries no information). Each track steps from one of its rows to its next, over the
    time between them (a frame it is missing from is bridged, as :func:`smooth_track` does)."""
    p = params or HMMParams()
    t = np.asarray(times_h, dtype=float)
    obs = np.asarray(calls, dtype=np.int64)
    pres = np.asarray(present, dtype=bool)
    n, m = obs.shape
    k = len(STATES)
    path = np.full((n, m), -1, dtype=np.int64)
    post = np.full((n, m, k), np.nan)
    if n == 0 or m == 0:
        return FieldSmoothed(path, post, np.full(n, np.nan), np.full(n, np.nan))
    c = np.nan_to_num(np.asarray(certainty, dtype=float), nan=0.0).clip(0.0, 1.0)
    if unknown is not None:
        c = np.where(np.asarray(unknown, dtype=bool), c * p.unknown_weight, c)
    w = 1.0 / k + (p.accuracy - 1.0 / k) * c
    informative = pres & (obs >= 0)
    e = np.ones((n, m, k))
    e[informative] = ((1.0 - w) / (k - 1))[informative][:, None]
    ii, jj = np.nonzero(informative)
    e[ii, jj, obs[ii, jj]] = w[ii, jj]
    start = np.asarray(p.start, dtype=float)
    start = start / start.sum()
    with np.errstate(divide="ignore"):
        loge, logs = np.log(e), np.log(start)
    rows = np.arange(n)
    # each row's previous and next row of the same track (-1: none)
    prev = np.full((n, m), -1, dtype=np.int64)
    nxt = np.full((n, m), -1, dtype=np.int64)
    last_seen = np.full(n, -1, dtype=np.int64)
    for i in range(m):
        prev[pres[:, i], i] = last_seen[pres[:, i]]
        last_seen[pres[:, i]] = i
    next_seen = np.full(n, -1, dtype=np.int64)
    for i in range(m - 1, -1, -1):
        nxt[pres[:, i], i] = next_seen[pres[:, i]]
        next_seen[pres[:, i]] = i

    def groups(i: int, link: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """Tracks with a row at ``i``, grouped by the linked row's index (one matrix each)."""
        here = np.nonzero(pres[:, i] & (link[:, i] >= 0))[0]
        return [(here[link[here, i] == j], int(j)) for j in np.unique(link[here, i])]

    # Viterbi
    v = np.zeros((n, m, k))
    back = np.zeros((n, m, k), dtype=np.int64)
    for i in range(m):
        fresh = pres[:, i] & (prev[:, i] < 0)
        v[fresh, i] = logs + loge[fresh, i]
        for tr, j in groups(i, prev):
            with np.errstate(divide="ignore"):
                lt = np.log(transition(p, t[i] - t[j]))
            cand = v[tr, j][:, :, None] + lt[None]
            back[tr, i] = np.argmax(cand, axis=1)
            v[tr, i] = np.take_along_axis(cand, back[tr, i][:, None, :], axis=1)[:, 0] + loge[tr, i]
    has = last_seen >= 0
    cur = np.zeros(n, dtype=np.int64)
    cur[has] = np.argmax(v[rows[has], last_seen[has]], axis=1)
    at = last_seen.copy()
    while True:
        live = has & (at >= 0)
        if not live.any():
            break
        path[rows[live], at[live]] = cur[live]
        step = live & (prev[rows, np.maximum(at, 0)] >= 0)
        cur[step] = back[rows[step], at[step], cur[step]]
        at = np.where(step, prev[rows, np.maximum(at, 0)], -1)
    # forward-backward (scaled)
    alpha = np.zeros((n, m, k))
    for i in range(m):
        fresh = pres[:, i] & (prev[:, i] < 0)
        a = start * e[fresh, i]
        alpha[fresh, i] = a / a.sum(axis=1, keepdims=True)
        for tr, j in groups(i, prev):
            a = (alpha[tr, j] @ transition(p, t[i] - t[j])) * e[tr, i]
            alpha[tr, i] = a / a.sum(axis=1, keepdims=True)
    beta = np.ones((n, m, k))
    for i in range(m - 1, -1, -1):
        for tr, j in groups(i, nxt):
            b = (e[tr, j] * beta[tr, j]) @ transition(p, t[j] - t[i]).T
            beta[tr, i] = b / b.sum(axis=1, keepdims=True)
    pp = alpha * beta
    with np.errstate(invalid="ignore"):
        pp /= pp.sum(axis=2, keepdims=True)
    post[pres] = pp[pres]
    dead = np.isin(path, [_IDX[s] for s in DEATH_STATES])
    apo = np.isin(path, [_IDX["apoptotic"], _IDX["dead"]])
    death = np.where(dead.any(axis=1), t[dead.argmax(axis=1)], np.nan)
    onset = np.where(apo.any(axis=1), t[apo.argmax(axis=1)], np.nan)
    return FieldSmoothed(path, post, onset, death)
