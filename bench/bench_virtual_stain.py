"""Virtual PI: does teaching a network the marker pixel by pixel beat 144 dead labels? (bf_pi_mcf7, training experiments)

    .venv/bin/python bench/bench_virtual_stain.py [--steps 1500] [--write bench/results/virtual_stain.md]

A research bench, not a recipe. The per-cell label leaves a network 144 dead examples to learn
from; the PI plane itself gives a target at every pixel of every training field ("in-silico
labelling"). A small U-Net (4 levels, 16-128 channels, about 0.5 M weights, from scratch) learns
to predict the field's PI, in background MADs and on a log scale, from the brightfield plane
alone, nuclei weighted 5x. Each held-out nucleus's predicted PI (mean over its mask) is then its
label-free death score.

The folds are :mod:`bench.bench_marker_cv`'s (5 folds by experiment over the training
experiments; the test experiments are never read). Reported, pooled over the held-out folds: the
AUC of the predicted PI against the set's PI rule, beside the class-balanced logistic regression on
the morphology encoder's 75 measurements, and both together (the predicted PI added as a 76th
measurement). Training takes about 8 minutes a fold on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import emit, need_data  # noqa: E402
from bench.bench_marker_cv import all_folds, logistic_oof, nuclei  # noqa: E402
from bench.bench_marker_truth import read_field  # noqa: E402

PATCH, BATCH, NUCLEUS_WEIGHT, LOG_SCALE = 128, 8, 5.0, float(np.log1p(100.0))


def planes(stem: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(normalised brightfield, log-PI target, pixel weight, nucleus labels) of one field."""
    plane, labels, _ = read_field(stem)
    bf = plane["brightfield_channel"].astype(np.float32)
    med = float(np.median(bf))
    bf = (bf - med) / (1.4826 * float(np.median(np.abs(bf - med))) or 1.0)
    pi = plane["dead_nuclei_channel"].astype(np.float32)
    bg = pi[labels == 0]
    pmed = float(np.median(bg))
    z = (pi - pmed) / (float(np.median(np.abs(bg - pmed))) or 1.0)
    target = (np.log1p(np.clip(z, 0, None)) / LOG_SCALE).astype(np.float32)
    return bf, target, (1.0 + (NUCLEUS_WEIGHT - 1.0) * (labels > 0)).astype(np.float32), labels


def unet() -> object:
    import torch
    from torch import nn

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(True),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(True))

    class UNet(nn.Module):
        def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
            super().__init__()
            self.down = nn.ModuleList([block(1 if i == 0 else widths[i - 1], w) for i, w in enumerate(widths)])
            self.up = nn.ModuleList([block(widths[i] + widths[i + 1], widths[i]) for i in range(len(widths) - 1)])
            self.out = nn.Conv2d(widths[0], 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, b in enumerate(self.down):
                x = b(x)
                if i < len(self.down) - 1:
                    skips.append(x)
                    x = nn.functional.max_pool2d(x, 2)
            for i in reversed(range(len(self.up))):
                x = self.up[i](torch.cat([nn.functional.interpolate(x, scale_factor=2.0), skips[i]], 1))
            return self.out(x)[:, 0]

    return UNet()


def train_and_predict(train: list[tuple[np.ndarray, ...]], test: list[tuple[np.ndarray, ...]], steps: int, seed: int) -> list[np.ndarray]:
    """Fit the U-Net on random augmented patches of the training fields; each test field's predicted log-PI."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = unet()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)  # type: ignore[attr-defined]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    net.train()  # type: ignore[attr-defined]
    for _ in range(steps):
        xs, ts, ws = [], [], []
        for _ in range(BATCH):
            bf, target, weight, _ = train[rng.integers(len(train))]
            i, j = rng.integers(0, bf.shape[0] - PATCH + 1), rng.integers(0, bf.shape[1] - PATCH + 1)
            k, flip = int(rng.integers(4)), rng.random() < 0.5
            views = [np.rot90(a[i:i + PATCH, j:j + PATCH], k) for a in (bf, target, weight)]
            views = [v[:, ::-1] if flip else v for v in views]
            xs.append(views[0] * rng.uniform(0.8, 1.25) + rng.normal(0, 0.1))
            ts.append(views[1])
            ws.append(views[2])
        x = torch.from_numpy(np.ascontiguousarray(np.stack(xs), dtype=np.float32))[:, None]
        t, w = (torch.from_numpy(np.ascontiguousarray(np.stack(a))) for a in (ts, ws))
        loss = (w * (net(x) - t) ** 2).mean()  # type: ignore[operator]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()  # type: ignore[attr-defined]
    out = []
    with torch.no_grad():
        for bf, *_ in test:
            h, w_ = bf.shape
            padded = np.pad(bf, ((0, -h % 8), (0, -w_ % 8)), mode="reflect")
            out.append(net(torch.from_numpy(padded)[None, None])[0].numpy()[:h, :w_])  # type: ignore[operator]
    return out


def main() -> int:
    from scipy import ndimage as ndi
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps a fold (batch of 8 patches of 128 px)")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    need_data()
    import torch

    torch.set_num_threads(2)
    n = nuclei()
    fold = all_folds(n)
    stems = list(dict.fromkeys(n.stems))
    field_fold = {s: int(fold[n.stems.index(s)]) for s in stems}
    fields = {s: planes(s) for s in stems}
    virtual = np.zeros(len(n.pi))
    st = np.array(n.stems)
    t0 = time.perf_counter()
    for j in range(int(fold.max()) + 1):
        test = [s for s in stems if field_fold[s] == j]
        predicted = train_and_predict([fields[s] for s in stems if field_fold[s] != j], [fields[s] for s in test], args.steps, j)
        for s, pred in zip(test, predicted, strict=True):
            labels = fields[s][3]
            ids = sorted(int(v) for v in np.unique(labels[labels > 0]))
            virtual[st == s] = ndi.mean(pred, labels, ids)  # nuclei() lists each field's nuclei by label
        if sys.stderr.isatty():
            print(f"fold {j + 1}/{int(fold.max()) + 1} trained ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    keep = n.scored
    y, f = n.dead[keep], fold[keep]
    morph = logistic_oof(n.x[keep], y, f)
    both = logistic_oof(np.column_stack([n.x[keep], virtual[keep]]), y, f)
    lines = [f"Virtual PI from brightfield (U-Net, {args.steps} steps a fold, from scratch), 5 folds by experiment over "
             f"the training experiments of bf_pi_mcf7: {int(keep.sum())} scored nuclei, {int(y.sum())} PI-dead. "
             f"Training took {time.perf_counter() - t0:.0f} s in all.", "",
             "| label-free score | AUC against the PI rule |", "|---|---|",
             f"| predicted PI in the nucleus (virtual stain) | {roc_auc_score(y, virtual[keep]):.3f} |",
             f"| logistic regression on the 75 morphology measurements | {roc_auc_score(y, morph):.3f} |",
             f"| the same with the predicted PI as a 76th measurement | {roc_auc_score(y, both):.3f} |"]
    emit(lines, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
