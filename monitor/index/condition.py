"""Feature-space conditioning fitted on the reference cells: standardise, PCA-whiten, L2-normalise.

Frozen ImageNet features are badly conditioned for nearest-neighbour search:
a few high-variance directions (illumination, background, framing) dominate
the L2 distance, and the parts of a multi-layer or multi-encoder vector sit on
very different scales. :class:`Conditioner` maps a raw (concatenated) vector
``x`` to::

    z = (x - mean) / scale                      # per-feature standardisation
    w = z @ proj                                # PCA to ``dim`` components, whitened:
                                                #   proj = V / sqrt((1 - s) lambda + s mean(lambda))
    y = w / ||w||                               # L2 normalisation (optional, on by default)

``V`` and ``lambda`` are the leading eigenvectors and eigenvalues of the
standardised references' covariance; the shrinkage ``s`` (0..1) pulls every
eigenvalue towards their mean, so the weakest kept directions (mostly noise)
are not blown up by whitening. Everything is fitted on the reference cells
only (``index build``, or the training part in ``index search``) and applied
unchanged to every query, by the index itself (:meth:`monitor.index.search.VectorSearch.prepare`),
so the service, ``classify`` and ``evaluate`` transform queries identically.

On disk (inside the index folder, checksummed in ``meta.json``, plain
``.npy`` read with ``allow_pickle=False``): ``condition_mean.npy`` (D,),
``condition_scale.npy`` (D,), ``condition_proj.npy`` (D, d); the record in
``meta.json`` (:meth:`Conditioner.record`) states the method, D, d, the
shrinkage, whether L2 normalisation is applied and the number of references
it was fitted on.

A learned projection (``method = "logistic"``): where a calibration set is
small (hundreds of marker-labelled cells) and the features are few and
hand-made, an unsupervised whitening keeps directions that say nothing about
the state. The logistic method fits, on the standardised references, a
class-weighted (each class weighs as much as any other), L2-penalised
multinomial logistic regression and keeps its score directions: one column
(the log-odds of the second class against the first) for two classes, one
per class (centred logits) for more, each scaled to unit standard deviation
on the references. EWC-FAISS then searches that space: the classifier is
still the k-NN, over a learned embedding. ``proj`` holds the directions; the
intercept is dropped (a shift moves no neighbour). Recorded as
``standardise-logistic`` with its penalty; L2 normalisation is off (a 1-d
vector has no direction to keep).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METHOD = "standardise-pca-whiten-l2"
LOGISTIC = "standardise-logistic"
METHODS = {"pca-whiten": METHOD, "logistic": LOGISTIC}
FILES = ("condition_mean.npy", "condition_scale.npy", "condition_proj.npy")


@dataclass(frozen=True)
class ConditioningSpec:
    """What to fit: PCA dimensions (capped at references - 1 and D), shrinkage, L2 normalisation;
    or (``method = "logistic"``) the class-weighted logistic score directions with ``penalty``."""

    dim: int = 192
    shrinkage: float = 0.1
    l2: bool = True
    method: str = "pca-whiten"
    penalty: float = 1e-2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"conditioning method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.penalty < 0:
            raise ValueError(f"conditioning penalty must be >= 0 (got {self.penalty})")
        if self.dim < 1:
            raise ValueError(f"conditioning dim must be >= 1 (got {self.dim})")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"conditioning shrinkage must be in [0, 1] (got {self.shrinkage})")


class Conditioner:
    """A fitted conditioning (see the module docstring); ``apply`` is the only query-side step."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, proj: np.ndarray, shrinkage: float, l2: bool, n_fit: int,
                 method: str = METHOD, penalty: float | None = None):
        self.method = method
        self.penalty = penalty
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.scale = np.ascontiguousarray(scale, dtype=np.float32)
        self.proj = np.ascontiguousarray(proj, dtype=np.float32)
        self.shrinkage = float(shrinkage)
        self.l2 = bool(l2)
        self.n_fit = int(n_fit)
        if self.mean.shape != self.scale.shape or self.mean.ndim != 1 or self.proj.shape[0] != self.mean.shape[0]:
            raise ValueError(f"inconsistent conditioning arrays: mean {self.mean.shape}, scale {self.scale.shape}, proj {self.proj.shape}")

    @property
    def in_dim(self) -> int:
        """Length of the raw (concatenated encoder) vectors the conditioning takes."""
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        """Length of the conditioned vectors the index stores."""
        return int(self.proj.shape[1])

    @classmethod
    def fit(cls, x: np.ndarray, spec: ConditioningSpec, labels: np.ndarray | None = None) -> Conditioner:
        """Fit on the (N, D) reference vectors ``x`` (and their ``labels``, for the logistic method).

        Features with (near) zero spread keep scale 1 (they carry no
        information and must not be amplified); ``dim`` is capped at
        ``min(N - 1, D)``.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"conditioning needs at least 2 reference vectors (got shape {x.shape})")
        n, d_in = x.shape
        mean = x.mean(axis=0)
        sd = x.std(axis=0)
        scale = np.where(sd > 1e-6 * max(float(sd.max()), 1e-30), sd, 1.0)
        z = (x - mean) / scale
        if spec.method == "logistic":
            if labels is None or len(labels) != n:
                raise ValueError("the logistic conditioning needs one class label per reference vector")
            proj = logistic_directions(z, np.asarray(labels), spec.penalty)
            return cls(mean, scale, proj, 0.0, False, n, LOGISTIC, spec.penalty)
        k = max(1, min(spec.dim, n - 1, d_in))
        # right singular vectors of the centred data = eigenvectors of its covariance
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        lam = s**2 / (n - 1)
        shrunk = (1.0 - spec.shrinkage) * lam[:k] + spec.shrinkage * float(lam.mean())
        proj = vt[:k].T / np.sqrt(np.maximum(shrunk, 1e-12))
        # a fixed sign per component (the largest loading positive): refits are reproducible
        sign = np.sign(vt[:k][np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
        proj *= np.where(sign == 0, 1.0, sign)
        return cls(mean, scale, proj, spec.shrinkage, spec.l2, n)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, D) raw vectors -> (N, d) conditioned float32 vectors."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"conditioning expects (N, {self.in_dim}) vectors (got {x.shape})")
        y = ((x - self.mean) / self.scale) @ self.proj
        if self.l2:
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(y, dtype=np.float32)

    def record(self) -> dict[str, Any]:
        """What ``meta.json`` says about it."""
        extra = {"penalty": self.penalty} if self.method == LOGISTIC else {}
        return extra | {
            "method": self.method,
            "in_dim": self.in_dim,
            "dim": self.dim,
            "shrinkage": self.shrinkage,
            "l2": self.l2,
            "fitted_on": self.n_fit,
            "files": list(FILES),
        }

    def save(self, folder: Path) -> list[str]:
        """Write the arrays (plain .npy); returns the file names to checksum."""
        for name, arr in zip(FILES, (self.mean, self.scale, self.proj), strict=True):
            np.save(folder / name, arr, allow_pickle=False)
        return list(FILES)

    @classmethod
    def load(cls, folder: Path, record: dict[str, Any]) -> Conditioner:
        """Read the arrays and check them against ``record``.

        Raises
        ------
        ValueError
            Unknown method, unreadable arrays, or shapes that differ from the
            record (the caller turns it into the index's one-line refusal).
        """
        if record.get("method") not in METHODS.values():
            raise ValueError(f"unknown conditioning method {record.get('method')!r}")
        try:
            mean, scale, proj = (np.load(folder / f, allow_pickle=False) for f in FILES)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the conditioning arrays ({e})") from None
        d_in, d = int(record["in_dim"]), int(record["dim"])
        if mean.shape != (d_in,) or scale.shape != (d_in,) or proj.shape != (d_in, d):
            raise ValueError(
                f"conditioning arrays have shapes {mean.shape}, {scale.shape}, {proj.shape}; meta.json says {d_in} -> {d}"
            )
        if not (np.isfinite(mean).all() and np.isfinite(proj).all() and (scale > 0).all()):
            raise ValueError("conditioning arrays hold non-finite values or non-positive scales")
        return cls(mean, scale, proj, float(record.get("shrinkage", 0.0)), bool(record.get("l2", True)), int(record.get("fitted_on", 0)),
                   str(record["method"]), record.get("penalty"))


def logistic_directions(z: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """(D, c) score directions of a class-weighted, L2-penalised multinomial logistic regression on ``z``.

    Classes are the distinct values of ``y`` in sorted order; each weighs
    N / (C n_c), so a rare state (dead cells are a tenth of a calibration run)
    counts as much as a common one. The loss is the weighted mean cross-entropy
    plus ``penalty * ||W||^2``, minimised by L-BFGS from zero (deterministic).
    Two classes give one column (the second class's log-odds against the
    first), more give one centred logit per class; each column is scaled to
    unit standard deviation on ``z``.
    """
    from scipy.optimize import minimize

    classes, yi = np.unique(y, return_inverse=True)
    c, (n, d) = len(classes), z.shape
    if c < 2:
        raise ValueError("the logistic conditioning needs references of at least two classes")
    counts = np.bincount(yi, minlength=c).astype(np.float64)
    w_row = (n / (c * counts))[yi] / n
    onehot = np.eye(c)[yi]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * c].reshape(d, c), theta[d * c :]
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        err = (np.exp(logp) - onehot) * w_row[:, None]
        value = -float((w_row * (logp * onehot).sum(axis=1)).sum()) + penalty * float((w * w).sum())
        grad = np.concatenate([(z.T @ err + 2 * penalty * w).ravel(), err.sum(axis=0)])
        return value, grad

    res = minimize(loss, np.zeros(d * c + c), jac=True, method="L-BFGS-B", options={"maxiter": 1000})
    w = res.x[: d * c].reshape(d, c)
    proj = (w[:, 1:] - w[:, :1]) if c == 2 else w - w.mean(axis=1, keepdims=True)
    sd = (z @ proj).std(axis=0)
    return proj / np.where(sd > 1e-12, sd, 1.0)
