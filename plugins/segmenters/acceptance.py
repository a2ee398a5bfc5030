"""A learned acceptance rule for the blob segmenter: which candidate blobs are cells, fitted on a lab's boxed frames.

The hand-set rule of the blob mode (:func:`~cellmonitor_plugins.segmenters.blobs.is_cell`:
size, a dark part, solidity, roundness, edge) was tuned once on one set; it
drops faint dead cells and edge-cut cells that a lab's annotators count, and
each lab's chamber, camera and cells differ. Here the lab's own boxed frames
(Pascal VOC, the same frames ``cellmonitor index build`` takes) teach it:

1. Candidates are drawn at a low seed threshold (``candidate_snr``), so
   nearly every boxed cell has one, and each is measured
   (:data:`~cellmonitor_plugins.segmenters.blobs.FEATURES`). The configured
   ``min_area_um2`` / ``max_area_um2`` stay hard limits (the segmenter
   applies them to every cell), so candidates outside them are left out.
2. A candidate is a positive when it matches a box one-to-one
   (:func:`monitor.segmentation.match_boxes`).
3. A logistic regression on the standardised features and their pairwise
   products (a quadratic decision surface: small, smooth, no pickle; stored
   as JSON numbers) is fitted with an L2 penalty, each box class weighing
   alike (:func:`class_weights`: the few faint dead cells that decide a
   frame's dead fraction are not traded for the many living ones). Its penalty and its
   decision threshold are chosen by grouped cross-validation over frames
   (``folds``), minimising what the dashboard shows: the mean per-frame
   count error |counted - boxes| / max(boxes, 1).

``cellmonitor segment-fit`` runs this and writes the model; the segmenter
option ``acceptance = "MODEL.json"`` (mode ``blobs``) uses it. The model
records the options that shape candidates and refuses a config whose values
differ (its features would mean something else).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import ConfigError

FORMAT = "cellmonitor.blob-acceptance/1"
#: the blob options that shape candidates and their features: a model fitted under other values is refused
CANDIDATE_OPTIONS = (
    "work_pixel_size_um", "background_um", "contrast_um", "cell_diameter_um", "seed_distance_um",
    "fg_snr", "fg_fraction", "line_um", "line_angles", "empty_snr",
)
#: default seed threshold of the candidates (the hand-set rule's is 50): ~97% of the boxed cells
#: of the livedead training frames get a candidate at 20 (85% are kept by the rule)
CANDIDATE_SNR = 20.0
LAMBDAS = (0.1, 1.0, 10.0, 100.0)
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.3, 0.751, 0.05))


def expand(z: np.ndarray) -> np.ndarray:
    """[1, z, z_i * z_j (i <= j)] of standardised features ``z`` (n, F): the quadratic design matrix."""
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    iu = np.triu_indices(z.shape[1])
    return np.hstack([np.ones((len(z), 1)), z, (z[:, :, None] * z[:, None, :])[:, iu[0], iu[1]]])


def sigmoid(s: np.ndarray) -> np.ndarray:
    """The logistic function, written with tanh (no overflow warning for large |s|)."""
    return np.asarray(0.5 * (1 + np.tanh(0.5 * s)))


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float, weight: np.ndarray | None = None) -> np.ndarray:
    """L2-penalised logistic regression weights (the intercept unpenalised) by L-BFGS; ``weight``: per sample."""
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=np.float64)
    sw = np.ones(len(y)) if weight is None else np.asarray(weight, dtype=np.float64)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = x @ w
        p = sigmoid(s)
        reg = np.r_[0.0, w[1:]]
        return float(sw @ (np.logaddexp(0, s) - y * s) + lam * reg @ reg), x.T @ (sw * (p - y)) + 2 * lam * reg

    res = minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 3000})
    return np.asarray(res.x)


@dataclass(frozen=True)
class FrameCandidates:
    """One labelled frame for the fit: its candidates' features, which matched a box, how many boxes, the hand-set rule's count."""

    name: str
    features: np.ndarray  # (n, F)
    matched: np.ndarray  # (n,) bool
    n_boxes: int
    rule_count: int  # cells the hand-set rule counts on this frame (the baseline)
    box_class: tuple[str, ...] = ()  # per candidate: the class of the box it matched ("" when none)


def count_error(frames: Sequence[FrameCandidates], counted: Sequence[int]) -> float:
    """Mean over frames of |counted - boxes| / max(boxes, 1) (a frame with no box counts every cell as an error)."""
    return float(np.mean([abs(int(n) - f.n_boxes) / max(f.n_boxes, 1) for f, n in zip(frames, counted, strict=True)]))


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class AcceptanceModel:
    """A fitted acceptance rule (see the module docstring); ``accept(features)`` is its use."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    threshold: float
    candidate_snr: float
    options: dict[str, Any]
    fitted: dict[str, Any] = field(default_factory=dict)

    def probability(self, features: np.ndarray) -> np.ndarray:
        """P(cell) of each candidate's features (n, F)."""
        f = np.asarray(features, dtype=np.float64).reshape(-1, len(self.features))
        if len(f) == 0:
            return np.zeros(0)
        s = expand((f - self.mean) / self.scale) @ self.weights
        return sigmoid(s)

    def accept(self, features: np.ndarray) -> np.ndarray:
        """Boolean: which candidates are cells."""
        return self.probability(features) >= self.threshold

    def check_options(self, options: Any, where: str) -> None:
        """Raise :class:`ConfigError` when ``options`` shape candidates differently from those the model was fitted on."""
        for k, v in self.options.items():
            now = getattr(options, k)
            if not math.isclose(float(now), float(v), rel_tol=1e-9, abs_tol=1e-12):
                raise ConfigError(
                    f"{where}: fitted with {k} = {v}, this config has {now}: refit it with "
                    "`cellmonitor segment-fit` under this config, or set the fitted value"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features": list(self.features),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "threshold": self.threshold,
            "candidate_snr": self.candidate_snr,
            "options": self.options,
            "fitted": self.fitted,
        }

    def save(self, path: Path) -> None:
        """Write the model as JSON, atomically (a reader never sees half a model)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, features: Sequence[str]) -> AcceptanceModel:
        """Read a model written by :meth:`save`; any problem is one :class:`ConfigError` line naming the file."""
        path = Path(path)
        where = f"acceptance model {path}"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file (write one with `cellmonitor segment-fit`)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{where}: not readable JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ConfigError(f"{where}: not a blob acceptance model (format {FORMAT!r} expected)")
        if d.get("features") != list(features):
            raise ConfigError(f"{where}: fitted on other features ({d.get('features')}); refit it with `cellmonitor segment-fit`")
        opts = d.get("options")
        if not isinstance(opts, dict) or set(opts) != set(CANDIDATE_OPTIONS) or not all(_number(v) for v in opts.values()):
            raise ConfigError(f"{where}: malformed (options must give a number for each of {', '.join(CANDIDATE_OPTIONS)})")
        if not (_number(d.get("candidate_snr")) and d["candidate_snr"] > 0):
            raise ConfigError(f"{where}: malformed (candidate_snr must be a positive number)")
        try:
            n = len(features)
            mean, scale, weights = (np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "weights"))
            model = cls(tuple(features), mean, scale, weights, float(d["threshold"]), float(d["candidate_snr"]),
                        {str(k): v for k, v in dict(d["options"]).items()}, dict(d.get("fitted", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        if mean.shape != (n,) or scale.shape != (n,) or weights.shape != (1 + n + n * (n + 1) // 2,):
            raise ConfigError(f"{where}: malformed (array sizes do not match {n} features)")
        if not (np.isfinite(weights).all() and np.isfinite(mean).all() and (scale > 0).all() and 0 < model.threshold < 1):
            raise ConfigError(f"{where}: malformed (non-finite weights, scale <= 0 or threshold outside (0, 1))")
        return model


@dataclass(frozen=True)
class FitReport:
    """What ``segment-fit`` prints: the frames, the recall ceiling, the rule's and the learned rule's count errors."""

    frames: int
    boxes: int
    candidates: int
    boxes_with_candidate: int
    rule_count_error: float
    cv_count_error: float
    lam: float
    threshold: float
    grid: list[tuple[float, float, float]]  # (lam, threshold, cv count error)


def class_weights(frames: Sequence[FrameCandidates]) -> np.ndarray:
    """Per candidate: 1 for a candidate on no box; for one on a box, the inverse frequency of its box's class
    among the matched candidates, scaled so the positives keep their total weight.

    A rare state (a few dead cells among many living ones) then weighs as much
    as a common one: the rule is not free to drop the faint dead cells that
    decide the dead fraction to win a little on the living ones.
    """
    cls = [c if m else "" for f in frames for c, m in zip(f.box_class or ("cell",) * len(f.matched), f.matched, strict=True)]
    pos = [c for c in cls if c]
    freq = {c: pos.count(c) for c in set(pos)}
    return np.array([len(pos) / (len(freq) * freq[c]) if c else 1.0 for c in cls])


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.where(x.std(0) > 1e-9, x.std(0), 1.0)


def fit_acceptance(
    frames: Sequence[FrameCandidates],
    *,
    candidate_snr: float,
    options: dict[str, Any],
    folds: int = 5,
    lambdas: Sequence[float] = LAMBDAS,
    thresholds: Sequence[float] = THRESHOLDS,
    seed: int = 0,
    balance: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[AcceptanceModel, FitReport]:
    """Fit the acceptance rule on labelled frames; penalty and threshold by ``folds``-fold CV over frames.

    Raises ``ValueError`` when the frames hold too few positives or negatives
    to fit (fewer than 10 of either).
    """
    from cellmonitor_plugins.segmenters.blobs import FEATURES

    nf = len(FEATURES)
    x_all = np.vstack([f.features.reshape(-1, nf) for f in frames]) if frames else np.zeros((0, nf))
    y_all = np.concatenate([f.matched for f in frames]) if frames else np.zeros(0, bool)
    if y_all.sum() < 10 or (~y_all).sum() < 10:
        raise ValueError(
            f"{int(y_all.sum())} candidates matched a box and {int((~y_all).sum())} did not: at least 10 of each are needed "
            "(more boxed frames, or a lower --candidate-snr)"
        )
    with_candidates = [i for i, f in enumerate(frames) if len(f.matched)]
    if len(with_candidates) < 2:
        raise ValueError(f"candidates on {len(with_candidates)} frame(s): at least 2 frames with candidates are needed for cross-validation")
    folds = max(2, min(folds, len(with_candidates)))
    # every fold holds frames with candidates (frames without any count as errors wherever they fall)
    fold = np.zeros(len(frames), int)
    fold[with_candidates] = np.random.default_rng(seed).permutation(len(with_candidates)) % folds
    empty = [i for i, f in enumerate(frames) if not len(f.matched)]
    fold[empty] = np.arange(len(empty)) % folds
    probs = {lam: [np.zeros(0)] * len(frames) for lam in lambdas}
    steps, done = folds * len(lambdas) + 1, 0
    for k in range(folds):
        train = [f for f, g in zip(frames, fold, strict=True) if g != k and len(f.matched)]
        x = np.vstack([f.features for f in train])
        y = np.concatenate([f.matched for f in train])
        sw = class_weights(train) if balance else None
        mu, sd = _standardise(x)
        design = expand((x - mu) / sd)
        for lam in lambdas:
            w = fit_logistic(design, y, lam, sw)
            for i, (f, g) in enumerate(zip(frames, fold, strict=True)):
                if g == k and len(f.matched):
                    probs[lam][i] = sigmoid(expand((f.features - mu) / sd) @ w)
            done += 1
            if progress:
                progress(done, steps)
    grid = [(lam, thr, count_error(frames, [int((p >= thr).sum()) for p in probs[lam]])) for lam in lambdas for thr in thresholds]
    lam, thr, cv = min(grid, key=lambda t: (round(t[2], 6), abs(t[1] - 0.5), t[0]))
    mu, sd = _standardise(x_all)
    w = fit_logistic(expand((x_all - mu) / sd), y_all, lam, class_weights(frames) if balance else None)
    if progress:
        progress(steps, steps)
    report = FitReport(
        frames=len(frames),
        boxes=sum(f.n_boxes for f in frames),
        candidates=len(y_all),
        boxes_with_candidate=int(y_all.sum()),
        rule_count_error=count_error(frames, [f.rule_count for f in frames]),
        cv_count_error=cv,
        lam=lam,
        threshold=thr,
        grid=grid,
    )
    fitted = {
        "frames": report.frames, "boxes": report.boxes, "candidates": report.candidates,
        "boxes_with_candidate": report.boxes_with_candidate, "folds": folds, "lambda": lam,
        "cv_count_error": round(cv, 4), "rule_count_error": round(report.rule_count_error, 4), "class_balance": balance,
    }
    model = AcceptanceModel(tuple(FEATURES), mu, sd, w, float(thr), float(candidate_snr), dict(options), fitted)
    return model, report
