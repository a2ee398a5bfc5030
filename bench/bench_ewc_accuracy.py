"""EWC-FAISS accuracy on real cells: plain k-NN vs EWC per encoder, the searched best combination,
transfer pbc -> bccd (and what closes the gap), and livedead boxes.

    .venv/bin/python bench/bench_ewc_accuracy.py [--encoders efficientnet-lite0,...] [--variants]

Protocol (DOMAIN.md section 2): pbc split 90/10 stratified with seed 0; the
combination search runs on a validation split (10% of the 90%) and its winner
is then scored once on the 10% test part. bccd is for evaluation only: a
prediction outside its 5 classes counts as wrong. livedead boxes are split
90/10 by frame (cells of one frame never on both sides). Embeddings come from
the shared cache (~/.cache/cellmonitor/embeddings), so reruns are cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import DATA, LITES, embedded, encoder, need_data  # noqa: E402
from monitor.index.dataset import Preprocess, group_split, stratified_split  # noqa: E402
from monitor.index.evaluate import evaluate  # noqa: E402
from monitor.index.ewc import EWCParams  # noqa: E402
from monitor.index.store import ReferenceIndex  # noqa: E402
from monitor.index.tune import SearchRow, best_ewc, combination_search  # noqa: E402
from monitor.report.classification import table  # noqa: E402

SHARED = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
WHOLE = Preprocess(framing="whole", crop_px=224)
BOX = Preprocess(crop_px=64)
PAPER = EWCParams(10, 1000, 0.3, True)
MID = EWCParams(10, 1000, 0.5, True)


def short(ids: tuple[str, ...] | list[str]) -> str:
    return "+".join(i.split("@")[0].replace("efficientnet-", "") for i in ids)


def method_name(p: EWCParams) -> str:
    return f"EWC k{p.k_min}..{p.k_max} thr {p.entropy_threshold:g}" + ("" if p.reweight else ", no reweight")


def rows_for(train_x: np.ndarray, train_y: np.ndarray, classes: tuple[str, ...], test_x: np.ndarray, test_names: list[str], dims: list[int], label: str, params: list[EWCParams]) -> list[list[object]]:
    """Rows: the plain 20-NN baseline, then one per EWC setting, on one exact L2 index."""
    idx = ReferenceIndex.build(train_x, train_y, classes, [{"name": str(d), "id": str(i), "dim": d} for i, d in enumerate(dims)], structure="flat")
    out: list[list[object]] = []
    for p in params:
        ev = evaluate(idx, test_x, test_names, p, 20)
        if not out:
            out.append([label, "plain 20-NN (baseline)", ev.baseline.macro_accuracy, 20.0])
        out.append([label, method_name(p), ev.ewc.macro_accuracy, ev.ewc.mean_k])
    return out


def subset_summary(ranked: list[SearchRow]) -> list[list[object]]:
    """Per encoder subset: best EWC configuration and the plain k-NN baseline on validation."""
    out = []
    for sub in dict.fromkeys(r.encoders for r in ranked):
        ewc = next(r for r in ranked if r.encoders == sub and r.method == "EWC")
        plain = next(r for r in ranked if r.encoders == sub and r.method != "EWC")
        out.append([short(sub), plain.macro_accuracy, ewc.macro_accuracy, f"k {ewc.k_min}..{ewc.k_max}, thr {ewc.threshold:g}, reweight {ewc.reweight}", ewc.mean_k])
    return out


def unique(selections: list[list[str]]) -> list[list[str]]:
    """Encoder selections without repeats (the search winner may be a single encoder)."""
    return [list(t) for t in dict.fromkeys(tuple(s) for s in selections)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default=",".join(LITES))
    ap.add_argument("--variants", action="store_true", help="transfer variants (re-embeds a pbc subset under new crops)")
    ap.add_argument("--variant-per-class", type=int, default=60)
    args = ap.parse_args()
    need_data()
    names = tuple(args.encoders.split(","))
    ids = [encoder(n).id for n in names]

    # ---- pbc in distribution
    pbc = embedded(DATA / "pbc", names, WHOLE)
    dim = {e: int(pbc.vectors[e].shape[1]) for e in ids}
    tr, te = stratified_split(pbc.labels, 0.1, seed=0)
    test_names = [pbc.classes[i] for i in pbc.labels[te]]
    rows: list[list[object]] = []
    for e in ids:
        rows += rows_for(pbc.vectors[e][tr], pbc.labels[tr], pbc.classes, pbc.vectors[e][te], test_names, [dim[e]], short([e]), [PAPER, MID])
    # combination search (power set x grid) on a validation split of the training part
    sub_tr, sub_val = stratified_split(pbc.labels[tr], 0.1, seed=1)
    ranked = combination_search(pbc.subset(tr), ids, sub_tr, sub_val)
    win = best_ewc(ranked)
    wp = EWCParams(win.k_min, win.k_max, win.threshold, win.reweight)
    x = pbc.concat(list(win.encoders))
    rows += rows_for(x[tr], pbc.labels[tr], pbc.classes, x[te], test_names, [dim[e] for e in win.encoders], f"searched: {short(win.encoders)}", [wp])
    if len(ids) > 1:
        allx = pbc.concat(ids)
        rows += rows_for(allx[tr], pbc.labels[tr], pbc.classes, allx[te], test_names, [dim[e] for e in ids], f"all: {short(ids)}", [PAPER, MID])
    print(f"## pbc, 8 classes, 90/10 split (seed 0): {len(tr)} references, {len(te)} test cells\n")
    print(table(["encoders", "method", "macro accuracy", "mean k"], rows))
    print(f"\ncombination search: {len(ranked)} configurations ({len(set(r.encoders for r in ranked))} encoder subsets x k range x threshold x reweighting, "
          f"and plain 20-NN) on {len(sub_val)} validation cells; winner {short(win.encoders)}, "
          f"k {win.k_min}..{win.k_max}, thr {win.threshold:g}, reweight {win.reweight}, validation macro {win.macro_accuracy:.3f}\n")
    print(table(["encoder subset", "val macro, plain 20-NN", "val macro, best EWC", "best EWC setting", "mean k"], subset_summary(ranked)))
    print()
    print(table(["rank", "encoders", "method", "k", "thr", "reweight", "val macro", "mean k"],
                [[r_ + 1, short(r.encoders), r.method, f"{r.k_min}..{r.k_max}", r.threshold, r.reweight, r.macro_accuracy, r.mean_k] for r_, r in enumerate(ranked[:8])]))

    # ---- transfer to bccd
    bccd = embedded(DATA / "bccd", names, WHOLE)
    bnames = [bccd.classes[i] for i in bccd.labels]
    trows: list[list[object]] = []
    keep = np.isin(np.array([pbc.classes[i] for i in pbc.labels]), SHARED)
    shared_y = np.array([SHARED.index(pbc.classes[i]) if pbc.classes[i] in SHARED else -1 for i in pbc.labels])
    for sel in unique([*[[e] for e in ids], list(win.encoders), list(ids)]):
        xa, xb = pbc.concat(sel), bccd.concat(sel)
        dims = [dim[e] for e in sel]
        trows += rows_for(xa, pbc.labels, pbc.classes, xb, bnames, dims, f"{short(sel)}, 8 ref classes", [PAPER, MID])
        trows += rows_for(xa[keep], shared_y[keep], tuple(SHARED), xb, bnames, dims, f"{short(sel)}, 5 shared ref classes", [MID, EWCParams(10, 1000, 0.5, False), EWCParams(50, 1000, 0.5, True)])
    print(f"\n## transfer: train on all {len(pbc)} pbc cells, test on {len(bccd)} bccd cells (5 classes, chance 0.20; a prediction outside them is wrong)\n")
    print(table(["encoders / reference", "method", "macro accuracy", "mean k"], trows))

    # ---- transfer variants: scale and colour normalisation (first encoder, pbc subset)
    if args.variants:
        from monitor.index.cache import EmbeddingCache, embed_dataset
        from monitor.index.dataset import Dataset, scan

        e0 = names[0]
        full = scan(DATA / "pbc", SHARED)
        rng = np.random.default_rng(0)
        picked = []
        for c in SHARED:
            fs = [f for f in full.files if f.labels[0] == c]
            picked += [fs[i] for i in sorted(rng.choice(len(fs), min(args.variant_per_class, len(fs)), replace=False))]
        small = Dataset(full.root, full.layout, tuple(picked), full.classes)
        vrows = []
        for label, prep in [
            ("whole image (baseline)", WHOLE),
            ("grey", Preprocess(framing="whole", colour="grey")),
            ("Reinhard stain normalisation", Preprocess(framing="whole", colour="reinhard")),
            ("segmented cell, scale-normalised (diam 120 px)", Preprocess(framing="cell", cell_diameter_px=120)),
            ("segmented cell + Reinhard", Preprocess(framing="cell", cell_diameter_px=120, colour="reinhard")),
        ]:
            a = embed_dataset(small, [encoder(e0)], prep, EmbeddingCache(), progress=False)
            b = embedded(DATA / "bccd", (e0,), prep)
            bn = [b.classes[i] for i in b.labels]
            eid = encoder(e0).id
            vrows += rows_for(a.vectors[eid], a.labels, a.classes, b.vectors[eid], bn, [int(a.vectors[eid].shape[1])], label, [MID, EWCParams(10, 1000, 0.3, True)])
        print(f"\n## transfer variants: {short([encoder(e0).id])}, reference = {len(picked)} pbc cells of the 5 shared classes ({args.variant_per_class}/class), test = bccd\n")
        print(table(["crop / colour", "method", "macro accuracy", "mean k"], vrows))

    # ---- livedead boxes
    ld = embedded(DATA / "livedead", names, BOX)
    ltr, lte = group_split(ld.labels, ld.groups, 0.1, seed=0)
    lnames = [ld.classes[i] for i in ld.labels[lte]]
    l_tr, l_val = group_split(ld.labels[ltr], ld.groups[ltr], 0.1, seed=1)
    lranked = combination_search(ld.subset(ltr), ids, l_tr, l_val)
    lwin = best_ewc(lranked)
    lrows: list[list[object]] = []
    for sel in unique([*[[e] for e in ids], list(ids)]):
        xl = ld.concat(sel)
        lrows += rows_for(xl[ltr], ld.labels[ltr], ld.classes, xl[lte], lnames, [dim[e] for e in sel], short(sel), [PAPER, MID])
    xl = ld.concat(list(lwin.encoders))
    lrows += rows_for(xl[ltr], ld.labels[ltr], ld.classes, xl[lte], lnames, [dim[e] for e in lwin.encoders], f"searched: {short(lwin.encoders)}",
                      [EWCParams(lwin.k_min, lwin.k_max, lwin.threshold, lwin.reweight)])
    print(f"\n## livedead boxes (64 px crops at the box centre), split 90/10 by frame: {len(ltr)} references, {len(lte)} test cells, "
          f"counts {dict(zip(ld.classes, np.bincount(ld.labels).tolist(), strict=True))}\n")
    print(table(["encoders", "method", "macro accuracy", "mean k"], lrows))
    print(f"\nlivedead combination search ({len(lranked)} configurations, {len(l_val)} validation cells, split by frame): winner {short(lwin.encoders)}, "
          f"k {lwin.k_min}..{lwin.k_max}, thr {lwin.threshold:g}, reweight {lwin.reweight}, validation macro {lwin.macro_accuracy:.3f}\n")
    print(table(["encoder subset", "val macro, plain 20-NN", "val macro, best EWC", "best EWC setting", "mean k"], subset_summary(lranked)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
