"""Unknown cells on real cells: a class the references lack vs held-out cells of the classes they hold.

    .venv/bin/python bench/bench_unknown.py [--hold-out basophil,platelet,erythroblast] [--write bench/results/unknown.md]

Data: ``../shared/data/pbc`` (8 white-blood-cell classes), split 90/10 by
class (seed 0, as bench_presets). For each held-out class C: the index is
built by the command line with its defaults from the training cells of the
other seven classes (``cellmonitor index build TRAIN --classes ...``; the
unknown distance is calibrated there, on the references alone). Then every
test cell is classified: the share of C's cells flagged unknown (should be
high) and the share of the seven known classes' test cells flagged unknown
(the false unknown rate; the target is under 5%). Baseline in the same run:
the same index's calibration quantile (0.99) means about 1% of its own
references lie beyond the distance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._ewc_common import DATA, need_data  # noqa: E402
from bench.bench_presets import cli, link_folders, pbc_split  # noqa: E402


def unknown_scores(index_dir: Path, test_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(test cells' unknown scores, their class names, flagged by the index, the references' leave-one-out scores)."""
    import json

    from monitor.config import PluginRef
    from monitor.index.cache import EmbeddingCache, embed_dataset
    from monitor.index.dataset import Preprocess, scan
    from monitor.index.ewc import EWCClassifier
    from monitor.index.store import ReferenceIndex
    from monitor.protocols import BuildContext
    from monitor.registry import Registry

    meta = json.loads((index_dir / "meta.json").read_text())
    reg = Registry([])
    encoders = [reg.build("encoders", PluginRef(name=e["name"], options=e.get("options") or {}), BuildContext(state_dir=Path.cwd()), where="bench")
                for e in meta["encoders"]]
    index = ReferenceIndex.load(index_dir, [{"id": e.id, "dim": e.dim} for e in encoders])
    ds = scan(test_dir)
    emb = embed_dataset(ds, encoders, Preprocess.from_dict(index.preprocessing or {}), EmbeddingCache(), progress=False)
    from monitor.index.unknown import _knn_mean

    q = emb.concat([e.id for e in encoders])
    states = EWCClassifier(index).classify(q)
    u = index.unknown
    assert states.unknown is not None and u is not None
    names = np.array([emb.classes[i] for i in emb.labels])
    return u.scores(q), names, states.unknown, _knn_mean(u.refs, u.refs, u.k, exclude_self=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hold-out", default="basophil,platelet,erythroblast")
    ap.add_argument("--write", type=Path, default=None)
    a = ap.parse_args()
    need_data()
    train, test = pbc_split(0)
    classes = sorted({p.parent.name for p in train})
    lines = ["| class left out of the references | its test cells flagged unknown (default 0.99) | known classes' test cells flagged (false unknown rate) | at quantile 0.97: left out / false | AUROC left out vs known | test cells (left out / known) |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        tr = link_folders(train, DATA / "pbc", work / "train")
        te = link_folders(test, DATA / "pbc", work / "test")
        for held in a.hold_out.split(","):
            keep = [c for c in classes if c != held]
            idx = work / f"index-without-{held}"
            cli("index", "build", str(tr), "--out", str(idx), "--classes", ",".join(keep), "--no-progress")
            scores, names, flagged, loo = unknown_scores(idx, te)
            out = names == held
            t97 = np.quantile(loo, 0.97)
            auc = float((scores[out][:, None] > scores[~out][None, :]).mean())
            lines.append(f"| {held} | {flagged[out].mean():.1%} | {flagged[~out].mean():.1%} | {(scores[out] > t97).mean():.1%} / {(scores[~out] > t97).mean():.1%} "
                         f"| {auc:.2f} | {out.sum()} / {(~out).sum()} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if a.write:
        a.write.parent.mkdir(parents=True, exist_ok=True)
        a.write.write_text(f"# Unknown cells on PBC (a class left out of the references)\n\n`{' '.join(sys.argv)}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
