"""EWC-FAISS speed on synthetic vectors: build, adaptive classify, Canberra fast path, HNSW growth.

    .venv/bin/python bench/bench_ewc_speed.py [--queries 10000] [--growth 14424,100000,1000000]

Synthetic references: 14,424 x 4,608 float32 (the paper's WBC set with three
encoders), 8 classes x 6 sub-clusters, non-negative (|.|) like pooled CNN features
(no exact zeros: FAISS's Canberra returns NaN for 0/0 terms). Queries are
drawn near randomly chosen references (same sub-cluster, fresh noise), so
neighbour labels agree about as often as on real cells; the table reports
how often. Prints Markdown tables; the baseline of each ratio is measured in
the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.index import EWCClassifier, EWCParams, HNSWParams, ReferenceIndex  # noqa: E402
from monitor.report import table  # noqa: E402


def synthetic(n: int, d: int, n_queries: int, seed: int = 0, noise: float = 0.9) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_classes, sub = 8, 6
    centres = rng.normal(0.3, 1.0, size=(n_classes * sub, d)).astype(np.float32)
    cl = rng.integers(0, n_classes * sub, n)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 20000):
        e = min(n, s + 20000)
        x[s:e] = np.abs(centres[cl[s:e]] + noise * rng.standard_normal((e - s, d), dtype=np.float32))
    pick = rng.integers(0, n, n_queries)
    q = np.abs(centres[cl[pick]] + noise * rng.standard_normal((n_queries, d), dtype=np.float32)).astype(np.float32)
    return x, (cl // sub).astype(np.int64), q, (cl[pick] // sub).astype(np.int64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=14_424)
    ap.add_argument("--dim", type=int, default=4_608)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--canberra-queries", type=int, default=16, help="queries timed on FAISS's exact Canberra")
    ap.add_argument("--growth", default="14424,100000,300000,1000000")
    ap.add_argument("--growth-dim", type=int, default=64)
    args = ap.parse_args()
    import faiss

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, faiss threads {faiss.omp_get_max_threads()}\n")
    x, y, q, qy = synthetic(args.n, args.dim, args.queries)
    classes = tuple(f"c{i}" for i in range(8))
    enc = [{"name": "synthetic", "id": "synthetic", "dim": args.dim}]
    rows = []

    # 1. build
    t = time.perf_counter()
    idx = ReferenceIndex.build(x, y, classes, enc, ewc=EWCParams(10, 1000, 0.5, True))
    t_build = time.perf_counter() - t
    rows.append([f"build exact L2 ({idx.structure}) {args.n:,} x {args.dim:,}", f"{t_build:.2f} s", "< 5 s", "PASS" if t_build < 5 else "FAIL"])

    # 2. classify with adaptive k
    clf = EWCClassifier(idx, EWCParams(10, 1000, 0.5, True))
    clf.classify(q[:50])
    t = time.perf_counter()
    st = clf.classify(q)
    t_cls = time.perf_counter() - t
    agree = float(np.mean(st.neighbor_labels[:, :10] == st.neighbor_labels[:, :1]))
    acc = float(np.mean(st.predicted == qy))
    rows.append([f"classify {args.queries:,} queries, EWC k 10..1000, thr 0.5", f"{t_cls:.2f} s", "< 10 s", "PASS" if t_cls < 10 else "FAIL"])
    t = time.perf_counter()
    idx.search(q, 10)
    t_fixed = time.perf_counter() - t
    rows.append(["  same queries, plain search k=10 (baseline)", f"{t_fixed:.2f} s", f"EWC/plain = {t_cls / t_fixed:.2f}x", ""])
    t = time.perf_counter()
    hidx = ReferenceIndex.build(x, y, classes, enc, structure="hnsw", hnsw=HNSWParams(16, 40, 64))
    t_hb = time.perf_counter() - t
    t = time.perf_counter()
    hst = EWCClassifier(hidx, EWCParams(10, 1000, 0.5, True)).classify(q)
    t_hc = time.perf_counter() - t
    rows.append(["build HNSW (M=16, efC=40), same vectors", f"{t_hb:.2f} s", "< 5 s", "PASS" if t_hb < 5 else "FAIL"])
    rows.append([f"classify {args.queries:,} queries on HNSW, EWC k 10..1000", f"{t_hc:.2f} s", "< 10 s", "PASS" if t_hc < 10 else "FAIL"])
    rows.append(["  HNSW prediction agreement with exact", f"{np.mean(hst.predicted == st.predicted):.4f}", "", ""])
    del hidx
    print(table(["step", "time", "target", ""], rows))
    ks = np.bincount(st.k_used)
    print(f"\nquery realism: {agree:.1%} of the first 10 neighbour labels agree with the nearest one; EWC accuracy {acc:.3f}; "
          f"k used: " + ", ".join(f"k={k}: {c}" for k, c in enumerate(ks) if c) + "\n")

    # 3. Canberra
    from monitor.canberra import CanberraSearch

    cq = q[: args.canberra_queries]
    fidx = faiss.IndexFlat(args.dim, faiss.METRIC_Canberra)
    fidx.add(x)
    t = time.perf_counter()
    fd, fi = fidx.search(cq, 10)
    t_faiss = (time.perf_counter() - t) / len(cq)
    t = time.perf_counter()
    cs = CanberraSearch(x)
    t_prep = time.perf_counter() - t
    cs.search(cq[:2], 10)  # JIT warm-up (cached on disk after the first run)
    crow = []
    for k in (10, 100, 1000):
        nq = min(len(q), 256)
        t = time.perf_counter()
        d, i = cs.search(q[:nq], k)
        per = (time.perf_counter() - t) / nq
        crow.append([f"fast exact Canberra, k={k}, {nq} queries", f"{per * 1e3:.2f} ms", f"{t_faiss / per:.1f}x"])
    d10, i10 = cs.search(cq, 10)
    same = int(np.sum(np.all(i10 == fi, axis=1)))
    maxrel = float(np.max(np.abs(d10 - fd) / np.maximum(fd, 1e-9)))
    print(table(["Canberra search (14,424 x 4,608)", "per query", "vs FAISS"], [[f"FAISS IndexFlat METRIC_Canberra, k=10, {len(cq)} queries (baseline)", f"{t_faiss * 1e3:.1f} ms", "1.0x"], *crow]))
    print(f"\nidentical neighbour lists vs FAISS: {same}/{len(cq)} queries (ids and order, k=10); max relative distance difference {maxrel:.1e}; "
          f"preparation (dimension ordering) {t_prep:.2f} s once per index\n")
    del fidx, cs

    # 4. HNSW growth
    grow = []
    dim = args.growth_dim
    for n in [int(v) for v in args.growth.split(",") if v]:
        gx, gy, gq, _ = synthetic(n, dim, 1000, seed=1)
        t = time.perf_counter()
        h = ReferenceIndex.build(gx, gy, classes, [{"name": "s", "id": "s", "dim": dim}], structure="hnsw", hnsw=HNSWParams(16, 40, 64))
        tb = time.perf_counter() - t
        f = ReferenceIndex.build(gx, gy, classes, [{"name": "s", "id": "s", "dim": dim}], structure="flat")
        res = []
        for k in (10, 1000):
            t = time.perf_counter()
            _, hi = h.search(gq, k)
            th = (time.perf_counter() - t) / len(gq)
            t = time.perf_counter()
            _, fi_ = f.search(gq[:200], k)
            tf = (time.perf_counter() - t) / 200
            rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(hi[:200], fi_, strict=True)]))
            res += [f"{th * 1e3:.3f} ms", f"{tf * 1e3:.2f} ms", f"{rec:.3f}"]
        grow.append([f"{n:,}", f"{tb:.1f} s", *res])
        print(f"  done {n:,}", file=sys.stderr, flush=True)
        del h, f, gx
    print(table(["references", "HNSW build", "HNSW k=10", "exact k=10", "recall@10", "HNSW k=1000", "exact k=1000", "recall@1000"], grow))
    print(f"\nHNSW M=16, efConstruction=40, efSearch=max(64, k); dim {dim} (synthetic, 1,000 queries; exact timed on 200)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
