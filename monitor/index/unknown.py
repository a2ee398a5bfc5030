"""Unknown cells: farther from the references than the references are from each other.

At build time the index keeps its references' raw encoder vectors (up to
:data:`MAX_REFS`, a random subset beyond) and calibrates a distance: each
reference's mean Euclidean distance to its ``k`` nearest *other* references
(leave-one-out; ``k`` at most the references less one), and the ``quantile``
of those. A query whose mean distance
to its ``k`` nearest references exceeds it is **unknown**: unlike anything
the references hold (a cell type or state nobody labelled, debris, a new
stain). It is still labelled with its EWC state; the flag is counted beside.

Why raw vectors, not the index's conditioned space: the conditioning
projects onto the references' principal directions, which discards exactly
the directions in which a new kind of cell differs (on PBC with a class left
out, the raw space separated it better; ``bench/bench_unknown.py`` reports the
raw-space AUROC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: default quantile of the references' own leave-one-out distances (0.97 flagged several
#: percent of the demo's known cells with its 80 references)
QUANTILE = 0.99
#: neighbours whose mean distance is the score
K = 5
#: references kept for the check (a random subset beyond)
MAX_REFS = 20_000
FILE = "unknown_refs.npy"


def _knn_mean(queries: np.ndarray, refs: np.ndarray, k: int, exclude_self: bool = False, block: int = 1024) -> np.ndarray:
    """Mean Euclidean distance of each query to its ``k`` nearest rows of ``refs``."""
    import torch

    r = torch.from_numpy(np.ascontiguousarray(refs, dtype=np.float32))
    out = []
    for s in range(0, len(queries), block):
        q = torch.from_numpy(np.ascontiguousarray(queries[s : s + block], dtype=np.float32))
        d = torch.cdist(q, r)
        if exclude_self:
            d[torch.arange(len(q)), torch.arange(s, s + len(q))] = float("inf")
        kk = min(k, d.shape[1] - (1 if exclude_self else 0))
        out.append(d.topk(max(kk, 1), largest=False).values.mean(dim=1).numpy())
    return np.concatenate(out) if out else np.zeros(0)


class UnknownCheck:
    """The raw reference vectors and the calibrated distance (see the module docstring)."""

    def __init__(self, refs: np.ndarray, distance: float, quantile: float = QUANTILE, k: int = K):
        self.refs = np.ascontiguousarray(refs, dtype=np.float32)
        self.distance = float(distance)
        self.quantile = float(quantile)
        self.k = int(k)

    @classmethod
    def calibrate(cls, x: np.ndarray, quantile: float = QUANTILE, k: int = K, max_refs: int = MAX_REFS, seed: int = 0) -> UnknownCheck:
        """Fit on the references' raw vectors (at least two)."""
        if len(x) < 2:
            raise ValueError("the unknown-cell distance needs at least two references")
        refs = x if len(x) <= max_refs else x[np.sort(np.random.default_rng(seed).choice(len(x), max_refs, replace=False))]
        k = min(k, len(refs) - 1)  # the same k for the references (leave-one-out) and for queries
        loo = _knn_mean(refs, refs, k, exclude_self=True)
        return cls(refs, float(np.quantile(loo, quantile)), quantile, k)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Mean distance of each raw query vector to its k nearest references."""
        return _knn_mean(np.asarray(x, dtype=np.float32), self.refs, self.k)

    def flag(self, x: np.ndarray) -> np.ndarray:
        """True for queries farther than the calibrated distance."""
        return self.scores(x) > self.distance

    def add(self, x: np.ndarray) -> None:
        """Expert corrections become references of the check too (the distance is kept)."""
        self.refs = np.ascontiguousarray(np.concatenate([self.refs, np.asarray(x, dtype=np.float32)]))

    def record(self) -> dict[str, Any]:
        return {"distance": self.distance, "quantile": self.quantile, "k": self.k, "n_refs": int(len(self.refs)), "space": "raw", "file": FILE}

    def save(self, folder: Path) -> list[str]:
        """Write the reference vectors; returns the file names written."""
        np.save(folder / FILE, self.refs, allow_pickle=False)
        return [FILE]

    @classmethod
    def load(cls, folder: Path, rec: dict[str, Any], dim: int) -> UnknownCheck:
        """From the index folder, whose checksums the index has verified; ValueError on a wrong dimension."""
        path = folder / str(rec.get("file", FILE))
        refs = np.load(path, allow_pickle=False)
        if refs.ndim != 2 or refs.shape[1] != dim:
            raise ValueError(f"{path.name} holds {refs.shape} vectors, expected (N, {dim})")
        return cls(refs, float(rec["distance"]), float(rec.get("quantile", QUANTILE)), int(rec.get("k", K)))
