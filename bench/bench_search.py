"""Search at scale: exact (flat) vs HNSW with the build-time efSearch probe: timing and recall@k.

Usage: nice -n 5 python bench/bench_search.py [--n 1000000] [--queries 10000] [--k 100] [--write [FILE]]

References and queries: clustered Gaussian vectors, dim 128 (what the
``balanced`` preset stores after conditioning), L2-normalised as the
conditioned vectors are: 1,000 centres N(0, I), each point its centre plus
N(0, I) noise, so the clusters overlap and the vectors fill their 128
dimensions much as whitened features do (a hard set for a graph). Queries
are fresh draws, never references. k = 100 (EWC's k_max in every preset but
``raw``). Two sizes: 14,424 (the PBC reference set) and ``--n`` (default
1,000,000).

Per size: the exact flat index (build, 10,000-query search), HNSW (M 32,
efConstruction 80: the ``index build`` defaults) with the efSearch probe of
:func:`monitor.index.search.build_faiss` (1,000 held-out references, target
recall@k 0.95; its time is part of the build), and on the same graph the
efSearch the index used before the probe (``max(64, k)``), the baseline.
Recall@k is measured against the exact search of the same queries
(``--exact-queries`` to time the exact search on fewer queries at the large
size; then HNSW's recall is measured on those only and the table says so).

At 14,424 the conditioned path is timed as the classifier runs it: raw
2,064-d vectors (``balanced``'s Lite0 layers=all GeM) conditioned to 128-d
inside the search (centres N(0, 0.15^2 I), so that a share of the queries
is ambiguous), k = 100 and the EWC vote k 10..100, today's path (FAISS
flat up to ``GEMM_K``) against the previous one (torch GEMM + topk above
k = 64), in the same run, wall and CPU time (the CPU time of both threads
is the better guide when other jobs load the machine). The unknown-cell calibration is off in every build
here (it is not part of the search). The load average is printed with every
row: other jobs on this 2-core machine slow everything.
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

from monitor.index import search as search_mod  # noqa: E402
from monitor.index.condition import ConditioningSpec  # noqa: E402
from monitor.index.ewc import EWCClassifier, EWCParams  # noqa: E402
from monitor.index.search import HNSWParams, ProbeSpec, recall_at_k  # noqa: E402
from monitor.index.store import ReferenceIndex  # noqa: E402
from monitor.report.classification import table  # noqa: E402

DIM = 128
CLASSES = tuple(f"c{i}" for i in range(8))
RESULTS = Path(__file__).resolve().parent / "results" / "search.md"


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def clustered(n: int, centres: np.ndarray, seed: int, normalise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n points around the centres (one N(0, I) draw each), L2-normalised; and their centre's class (centre % 8)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, len(centres), n)
    x = np.empty((n, centres.shape[1]), np.float32)
    for s in range(0, n, 50_000):
        e = min(n, s + 50_000)
        x[s:e] = centres[c[s:e]] + rng.standard_normal((e - s, centres.shape[1]), dtype=np.float32)
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, (c % len(CLASSES)).astype(np.int64)


def timed(f, *a, **kw):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = f(*a, **kw)
    return out, time.perf_counter() - t


def best_of(repeats: int, f, *a) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Best wall time and best CPU time (all threads) of ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        f(*a)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def build(x: np.ndarray, y: np.ndarray, structure: str, k: int, **kw: object) -> ReferenceIndex:
    enc = [{"name": "synthetic", "id": "synthetic", "dim": x.shape[1]}]
    return ReferenceIndex.build(x, y, CLASSES, enc, structure=structure, ewc=EWCParams(10, k, 0.5, True),  # type: ignore[arg-type]
                                unknown_quantile=None, **kw)  # type: ignore[arg-type]


def size_rows(n: int, args: argparse.Namespace, centres: np.ndarray) -> tuple[list[list[str]], list[str]]:
    k, nq = args.k, args.queries
    x, y = clustered(n, centres, seed=n)
    q, _ = clustered(nq, centres, seed=1)
    rows, notes = [], []
    flat, tb = timed(build, x, y, "flat", k)
    ne = min(nq, args.exact_queries) if n > 100_000 else nq
    flat.search(q[:50], k)  # warm-up (thread pools, page-in)
    (ed, ei), tq = timed(flat.search, q[:ne], k)
    rows.append([f"{n:,}", "exact (flat)", f"{tb:.1f} s", f"{tq:.2f} s" + (f" ({ne:,} q)" if ne < nq else ""), f"{ne / tq:,.0f}", "1.000", "-", load()])
    print(f"  {n:,} exact done ({load()})", file=sys.stderr, flush=True)
    del flat
    spec = ProbeSpec(args.target, args.probe_queries)
    hnsw, tb = timed(build, x, y, "hnsw", k, hnsw=HNSWParams(args.m, args.ef_construction), probe=spec)
    del x
    p = hnsw.meta.search_probe
    assert p is not None
    hnsw.search(q[:50], k)
    (hd, hi), tq = timed(hnsw.search, q, k)
    rec = recall_at_k(hd[:ne], hi[:ne], ed)
    tried = ", ".join(f"{e}: {r:.3f}" for e, r in p.tried)
    rows.append([f"{n:,}", f"HNSW M {args.m}, efC {args.ef_construction}, probed", f"{tb:.1f} s (probe {p.seconds:.1f} s)", f"{tq:.2f} s",
                 f"{nq / tq:,.0f}", f"{rec:.3f}", f"{p.ef_search} (probe recall {p.recall:.3f})", load()])
    notes.append(f"{n:,}: probe ladder (efSearch: recall@{p.k} on {p.queries} held-out references) {tried}; target {p.target} "
                 f"{'met' if p.met else 'NOT met'}")
    before = max(64, k)
    hnsw.searcher.hnsw = HNSWParams(args.m, args.ef_construction, before)
    (bd, bi), tq = timed(hnsw.search, q, k)
    rows.append([f"{n:,}", "  same graph, efSearch before the probe", "", f"{tq:.2f} s", f"{nq / tq:,.0f}",
                 f"{recall_at_k(bd[:ne], bi[:ne], ed):.3f}", f"{before} (max(64, k))", load()])
    if ne < nq:
        notes.append(f"{n:,}: exact search timed on {ne:,} of the {nq:,} queries; HNSW recall measured on those {ne:,}")
    print(f"  {n:,} HNSW done ({load()})", file=sys.stderr, flush=True)
    return rows, notes


def conditioned_rows(args: argparse.Namespace) -> list[list[str]]:
    """14,424 references, raw 2,064-d conditioned to 128-d: k = 100 search and the EWC vote, previous path vs now."""
    rng = np.random.default_rng(7)
    # 48 centres (6 per class) close together: a share of the queries is ambiguous and EWC runs past k_min
    centres = (args.spread * rng.normal(size=(48, args.raw_dim))).astype(np.float32)
    x, y = clustered(14_424, centres, seed=8, normalise=False)
    q, _ = clustered(args.queries, centres, seed=9, normalise=False)
    idx, tb = timed(build, x, y, "flat", args.k, conditioning=ConditioningSpec(DIM, 0.1))
    del x
    rows = [[f"build: fit the conditioning ({args.raw_dim:,} -> {idx.dim}) and the flat index", f"{tb:.1f} s", "", "", load()]]
    clf = EWCClassifier(idx)
    idx.search(q[:50], args.k)
    out: dict[str, float] = {}
    for label, gemm_k in (("previous: torch GEMM + topk above k = 64", 64), (f"now: FAISS flat up to k = {search_mod.GEMM_K}", search_mod.GEMM_K)):
        search_mod.GEMM_K = gemm_k
        best, cpu = best_of(args.repeats, idx.search, q, args.k)
        out[label] = best
        rows.append([f"search {args.queries:,} raw queries, k = {args.k}, {label}", f"{best:.2f} s", f"{cpu:.2f} s",
                     f"{args.queries / best:,.0f} q/s", load()])
    prep, cpu = best_of(args.repeats, idx.searcher.prepare, q)
    rows.append([f"  of which conditioning the {args.queries:,} queries", f"{prep:.2f} s", f"{cpu:.2f} s", "", load()])
    st = clf.classify(q)
    tc, cpu = best_of(args.repeats, clf.classify, q)
    rows.append([f"EWC classify {args.queries:,} queries, k {clf.params.k_min}..{clf.params.k_max} (now)", f"{tc:.2f} s", f"{cpu:.2f} s",
                 f"{np.mean(st.k_used > clf.params.k_min):.1%} past k_min", load()])
    a, b = out.values()
    rows.append(["now / previous (k = 100 search, wall)", f"{b / a:.2f}x", "", "", ""])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="the large reference set (the small one is 14,424)")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--exact-queries", type=int, default=10_000, help="at the large size, time the exact search on this many queries")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--m", type=int, default=HNSWParams().m)
    ap.add_argument("--ef-construction", type=int, default=HNSWParams().ef_construction)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--probe-queries", type=int, default=1000)
    ap.add_argument("--raw-dim", type=int, default=2064)
    ap.add_argument("--spread", type=float, default=0.15, help="conditioned section: scale of the class centres (noise is 1)")
    ap.add_argument("--repeats", type=int, default=3, help="conditioned section: best of this many")
    ap.add_argument("--sections", default="conditioned,scale")
    ap.add_argument("--write", type=Path, nargs="?", const=RESULTS, default=None, metavar="FILE",
                    help=f"also write the tables to FILE (default {RESULTS.relative_to(RESULTS.parents[2])})")
    args = ap.parse_args()
    import faiss
    import torch

    sections = set(args.sections.split(","))
    out = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__} "
           f"({faiss.omp_get_max_threads()} threads), torch {torch.__version__} ({torch.get_num_threads()} threads); "
           f"command: {' '.join(sys.argv)}; load average at start {load()}\n"]
    print(out[0], flush=True)
    if "conditioned" in sections:
        text = table(["conditioned k-NN, 14,424 references (synthetic)", "wall (best)", "CPU, 2 threads", "", "load"], conditioned_rows(args))
        print(text + "\n", flush=True)
        out.append(text + "\n")
    if "scale" in sections:
        centres = np.random.default_rng(0).normal(size=(1000, DIM)).astype(np.float32)
        rows, notes = [], []
        for n in (14_424, args.n):
            r, nt = size_rows(n, args, centres)
            rows += r
            notes += nt
        text = table(["references", "search", "build", f"query {args.queries:,} (k = {args.k})", "queries/s", f"recall@{args.k}", "efSearch", "load"], rows)
        text += "\n\n" + "\n".join(f"- {v}" for v in notes)
        print(text + "\n", flush=True)
        out.append(text + "\n")
    end = f"load average at the end {load()}"
    print(end)
    out.append(end)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("# Search at scale: exact vs HNSW (bench/bench_search.py)\n\n" + "\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
